"""modules/sd_vae.py: the VAE list (name -> path) from models/VAE and *.vae.* beside the checkpoints."""
import glob
import os

from modules import paths, sd_models

vae_path = os.path.abspath(os.path.join(paths.models_path, "VAE"))
vae_dict = {}


def get_filename(filepath):
    return os.path.basename(filepath)


def refresh_vae_list():
    vae_dict.clear()
    patterns = [os.path.join(sd_models.model_path, "**/*.vae.safetensors"), os.path.join(vae_path, "**/*.safetensors")]
    for pattern in patterns:
        for filepath in glob.iglob(pattern, recursive=True):
            vae_dict[get_filename(filepath)] = filepath
