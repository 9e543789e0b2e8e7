"""modules/shared.py: cmd_opts, opts, state and the helpers extensions use."""
import argparse
import os

from modules import options, paths, shared_state
from modules.options import OptionInfo, options_section  # noqa: F401  (the webui re-exports these)

cmd_opts = argparse.Namespace(
    ckpt=None, ckpt_dir=None, vae_dir=None, api=False, api_auth=None, nowebui=False, no_gradio_queue=False,
    no_download_sd_model=True, lowram=False, data_dir=paths.script_path)
opts = options.Options({
    "sd_model_checkpoint": OptionInfo(None, "Stable Diffusion checkpoint", section=("sd", "Stable Diffusion")),
    "memmon_poll_rate": OptionInfo(8, "VRAM usage polls per second", section=("system", "System")),
    "profiling_enable": OptionInfo(False, "Enable profiling", section=("system", "System")),
    "profiling_filename": OptionInfo("trace.json", "Profile filename", section=("system", "System")),
})
state = shared_state.State()
config_filename = os.path.join(paths.script_path, "config.json")


class _MemMon:
    disabled = True


mem_mon = _MemMon()


def list_checkpoint_tiles(use_short=False):
    from modules import sd_models
    return sd_models.checkpoint_tiles(use_short)


def refresh_checkpoints():
    from modules import sd_models
    return sd_models.list_models()
