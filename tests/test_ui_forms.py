"""What a user types becomes a MergeRequest only if it is safe: names from the host's list, outputs inside the
models folder, sane numbers.  No Gradio needed (lib_rebasin.ui.forms is shared by the tab and the REST routes)."""
from __future__ import annotations

import os

import pytest

from lib_rebasin import jobs
from lib_rebasin.host.base import UnknownCheckpoint, parse_credentials, scan_checkpoints
from lib_rebasin.host.standalone import StandaloneHost
from lib_rebasin.ui import forms
from ui_support import copy_models


@pytest.fixture
def host(tmp_path, tiny_a, tiny_b):
    models = tmp_path / "models"
    copy_models({"a.safetensors": tiny_a, "b.safetensors": tiny_b, "c.safetensors": tiny_b}, models)
    (models / "vae.vae.safetensors").write_bytes(b"not read here")
    return StandaloneHost(str(models), device="cpu")


def test_the_folder_scan_lists_checkpoints_not_vaes_or_hidden_files(tmp_path):
    for name in ("B.safetensors", "a.ckpt", "sub/c.safetensors", "x.vae.safetensors", ".hidden/d.safetensors",
                 ".e.safetensors.tmp", "notes.txt"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    assert list(scan_checkpoints(str(tmp_path))) == ["a.ckpt", "B.safetensors", "sub/c.safetensors"]


@pytest.mark.parametrize("typed, expected", [
    ("my merge", "my merge.safetensors"),
    ("my merge.safetensors", "my merge.safetensors"),
    ("old.ckpt", "old.safetensors"),
    ("../../etc/passwd", "_.._etc_passwd.safetensors"),
    ("..\\..\\win", "_.._win.safetensors"),
    ("a:b*c?d|e<f>g\"h", "a_b_c_d_e_f_g_h.safetensors"),
    ("  .hidden  ", "hidden.safetensors"),
])
def test_output_names_become_plain_files_in_the_models_folder(host, typed, expected):
    path = forms.output_path(host.models_dir(), typed)
    assert os.path.basename(path) == expected
    assert os.path.dirname(path) == os.path.realpath(host.models_dir())


@pytest.mark.parametrize("typed", ["", "  ", "..", "CON", "nul.safetensors", "/"])
def test_unusable_output_names_are_refused(host, typed):
    with pytest.raises(ValueError):
        forms.output_path(host.models_dir(), typed)


def test_a_request_resolves_names_and_derives_the_output_name(host):
    request = forms.build_request(host, forms.Recipe(method="Amplified difference", models=["a.safetensors",
                                                                                            "b.safetensors"],
                                                     multiplier=2.5, dtype="bf16", device=""))
    assert request.method == "amp" and request.multiplier == 2.5 and request.dtype == "bf16"
    assert request.models == [os.path.join(host.models_dir(), n) for n in ("a.safetensors", "b.safetensors")]
    assert request.output == os.path.join(host.models_dir(), "amp_M2.5_a_b.safetensors")
    assert request.device == "cpu" and request.components == {"unet": "merge", "clip_l": "merge",
                                                              "clip_g": "merge", "vae": "a", "other": "a"}
    assert forms.suggested_name(host, forms.Recipe(method="amp", models=["a.safetensors", ""])) == ""


@pytest.mark.parametrize("recipe, message", [
    (dict(method="amp", models=["a.safetensors", ""]), "needs model B"),
    (dict(method="add-diff", models=["a.safetensors", "", ""]), "needs model B and C"),
    (dict(method="amp", models=["a.safetensors", "../../b.safetensors"]), "not in the checkpoint list"),
    (dict(method="amp", models=["a.safetensors", os.path.abspath(__file__)]), "not in the checkpoint list"),
    (dict(method="merge-many", models=["a.safetensors"]), "at least two models"),
    (dict(method="merge-many", models=["a.safetensors", "a.safetensors"]), "chosen once"),
    (dict(method="amp", models=["a.safetensors", "b.safetensors"], multiplier=float("nan")), "finite"),
    (dict(method="amp", models=["a.safetensors", "b.safetensors"], dtype="int8"), "unknown dtype"),
    (dict(method="amp", models=["a.safetensors", "b.safetensors"], device="tpu"), "unknown device"),
    (dict(method="amp", models=["a.safetensors", "b.safetensors"], components={"unet": "c"}), "unet source"),
    (dict(method="amp", models=["a.safetensors", "b.safetensors"], vae="other.vae.safetensors"), "VAE"),
    (dict(method="blend", models=["a.safetensors", "b.safetensors"]), "unknown merge method"),
])
def test_bad_recipes_are_refused_with_a_message(host, recipe, message):
    with pytest.raises(ValueError, match=message):
        forms.build_request(host, forms.Recipe(**recipe))


def test_unknown_names_raise_unknown_checkpoint(host):
    with pytest.raises(UnknownCheckpoint):
        host.checkpoint_path("zzz.safetensors")


def test_vae_choices_come_from_the_host_list(host):
    request = forms.build_request(host, forms.Recipe(method="amp", models=["a.safetensors", "b.safetensors"],
                                                     vae="vae.vae.safetensors"))
    assert request.vae == os.path.join(host.models_dir(), "vae.vae.safetensors")


def test_formula_shows_the_numbers():
    assert forms.formula_text("amp", 2.5, 0.5) == "A + 2.5·(B − A)"
    assert forms.formula_text("Weighted sum", 2, 0.25) == "(1 − 0.25)·A + 0.25·B"
    assert forms.formula_text("add-diff", -1, 0) == "A + -1·(B − C)"


def test_result_html_escapes_what_it_shows(tmp_path):
    result = jobs.MergeResult(path=str(tmp_path / "<script>x.safetensors"), bytes=3 * 2**20, seconds=1.25,
                              report={"keys": 3, "merged_keys": 2, "max_abs": 1.5, "diff_norm": 0.5,
                                      "difference": "B − A",
                                      "components": {"unet": {"source": "merge", "keys": 2, "diff_norm": 0.5,
                                                              "max_abs": 1.5}},
                                      "blocks": [{"block": "input_blocks.1", "keys": 2, "diff_norm": 0.5,
                                                  "max_abs": 1.5}]},
                              warnings=["<b>careful</b>"])
    result.report["matching"] = {"changed_groups": "3/106", "sweeps": [{}, {}], "converged": True,
                                 "objective_before": 1.0, "objective_after": 2.5}
    text = forms.result_html(result, str(tmp_path))
    assert "<script>" not in text and "&lt;script&gt;x.safetensors" in text
    assert "&lt;b&gt;careful&lt;/b&gt;" in text and "3.00 MiB" in text and "1.2 s" in text
    assert "input_blocks.1" in text and "width:100.0%" in text
    assert "Matching: 3/106 permutation groups changed · 2 sweep(s), converged · Σ⟨A, P(B)⟩ 1 → 2.5" in text


def test_error_html_lists_details():
    from lib_rebasin.merge import MergeError
    text = forms.error_html(MergeError("shapes differ", [f"key{i}" for i in range(15)]))
    assert text.startswith("<div class='error'>shapes differ<ul>") and "key11" in text and "3 more" in text


def test_api_credentials_parse_like_the_webui():
    assert parse_credentials("u:p, v:a:b") == {"u": "p", "v": "a:b"}
    assert parse_credentials(None) is None
    with pytest.raises(ValueError):
        parse_credentials("nopassword")


def test_host_adapters_and_forms_import_without_the_webui_or_gradio():
    """Only the UI layer imports gradio, and the adapters import the webui's `modules` lazily."""
    import subprocess
    import sys
    code = ("import sys; import lib_rebasin.host.a1111, lib_rebasin.host.forge, lib_rebasin.host.standalone, "
            "lib_rebasin.ui.forms, lib_rebasin.jobs; "
            "print(sorted(m for m in ('modules', 'gradio', 'backend') if m in sys.modules))")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=root).stdout
    assert out.strip() == "[]"
