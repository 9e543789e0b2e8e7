"""Forge's backend/memory_management.py: the device and the model unloading that frees VRAM."""
import torch

calls = []  # stand-in only: what was called, in order


def get_torch_device():
    return torch.device("cpu")


def unload_all_models():
    calls.append("unload_all_models")


def soft_empty_cache(force=False):
    calls.append("soft_empty_cache")
