"""modules/sd_models.py: the checkpoint registry (titles 'name [shorthash]' once a file is hashed, aliases),
listing, lookup, and the model moves and loads that making room for a job uses."""
import os
import re

from modules import paths, shared

model_dir = "Stable-diffusion"
model_path = os.path.abspath(os.path.join(paths.models_path, model_dir))
checkpoints_list = {}
checkpoint_aliases = {}
known_sha256 = {}  # stand-in for the webui's hash cache: abspath -> sha256


class CheckpointInfo:
    def __init__(self, filename):
        self.filename = filename
        abspath = os.path.abspath(filename)
        ckpt_dir = os.path.abspath(shared.cmd_opts.ckpt_dir) if shared.cmd_opts.ckpt_dir is not None else None
        self.is_safetensors = os.path.splitext(filename)[1].lower() == ".safetensors"
        if ckpt_dir and abspath.startswith(ckpt_dir):
            name = abspath.replace(ckpt_dir, '')
        elif abspath.startswith(model_path):
            name = abspath.replace(model_path, '')
        else:
            name = os.path.basename(filename)
        name = name.lstrip("\\/")
        self.name = name
        self.name_for_extra = os.path.splitext(os.path.basename(filename))[0]
        self.model_name = os.path.splitext(name.replace("/", "_").replace("\\", "_"))[0]
        self.hash = "0badc0de"
        self.sha256 = known_sha256.get(abspath)
        self.shorthash = self.sha256[0:10] if self.sha256 else None
        self.title = name if self.shorthash is None else f'{name} [{self.shorthash}]'
        self.short_title = (self.name_for_extra if self.shorthash is None
                            else f'{self.name_for_extra} [{self.shorthash}]')
        self.ids = [self.hash, self.model_name, self.title, name, self.name_for_extra, f'{name} [{self.hash}]']
        if self.shorthash:
            self.ids += [self.shorthash, self.sha256, f'{self.name} [{self.shorthash}]',
                         f'{self.name_for_extra} [{self.shorthash}]']

    def register(self):
        checkpoints_list[self.title] = self
        for id in self.ids:
            checkpoint_aliases[id] = self


def checkpoint_tiles(use_short=False):
    return [x.short_title if use_short else x.title for x in checkpoints_list.values()]


def _model_files():
    places = [model_path] + ([shared.cmd_opts.ckpt_dir] if shared.cmd_opts.ckpt_dir else [])
    found = []
    for place in places:
        for root, _, files in os.walk(place):
            for name in files:
                lower = name.lower()
                if lower.endswith((".ckpt", ".safetensors")) and not lower.endswith((".vae.ckpt", ".vae.safetensors")):
                    found.append(os.path.join(root, name))
    return sorted(found, key=str.casefold)


def list_models():
    checkpoints_list.clear()
    checkpoint_aliases.clear()
    for filename in _model_files():
        CheckpointInfo(filename).register()


re_strip_checksum = re.compile(r"\s*\[[^]]+]\s*$")


def get_closet_checkpoint_match(search_string):
    if not search_string:
        return None
    info = checkpoint_aliases.get(search_string, None)
    if info is not None:
        return info
    found = sorted([i for i in checkpoints_list.values() if search_string in i.title], key=lambda x: len(x.title))
    if found:
        return found[0]
    stripped = re.sub(re_strip_checksum, '', search_string)
    found = sorted([i for i in checkpoints_list.values() if stripped in i.title], key=lambda x: len(x.title))
    return found[0] if found else None


class SdModelData:
    def __init__(self):
        import threading
        self.sd_model = None
        self.loaded_sd_models = []
        self.was_loaded_at_least_once = False
        self.lock = threading.Lock()  # held by the first load (A1111 loads at startup in a thread)


model_data = SdModelData()
checkpoints_loaded = {}  # the state-dict cache of `sd_checkpoint_cache`
loads = []  # stand-in only: the CheckpointInfo of every load_model call


class _Parameter:
    def __init__(self, device):
        self.device = device


class FakeModel:
    """Stand-in only: a loaded model that remembers where it was moved."""
    def __init__(self, device="cuda", info=None):
        self.device = str(device)
        self.moves = []
        self.sd_checkpoint_info = info

    def to(self, device):
        self.device = str(device)
        self.moves.append(str(device))
        return self

    def parameters(self):
        import torch
        yield _Parameter(torch.device(self.device))


def send_model_to_cpu(m):
    m.to("cpu")


def send_model_to_device(m):
    from modules import devices
    m.to(devices.device)


def send_model_to_trash(m):
    m.to("meta")


def load_model(checkpoint_info=None, already_loaded_state_dict=None):
    from modules import devices
    loads.append(checkpoint_info)
    model = FakeModel(devices.device, checkpoint_info)
    model_data.sd_model = model
    model_data.loaded_sd_models.insert(0, model)
    model_data.was_loaded_at_least_once = True
    return model


def unload_model_weights(sd_model=None, info=None):
    send_model_to_cpu(sd_model or model_data.sd_model)
    return sd_model


def reload_model_weights(sd_model=None, info=None, forced_reload=False):
    return sd_model
