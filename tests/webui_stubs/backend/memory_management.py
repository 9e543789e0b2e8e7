"""Forge's backend/memory_management.py: the device, free memory, and moving models off and onto the GPU."""
import torch

calls = []  # stand-in only: what was called, in order
free_bytes = {"cpu": 64 << 30, "cuda": 24 << 30}  # stand-in only: what get_free_memory reports per device type
current_loaded_models = []  # LoadedModel-likes: .model, .device


def get_torch_device():
    return torch.device("cpu")


def get_free_memory(dev=None, torch_free_too=False):
    dev = dev or get_torch_device()
    free = free_bytes[dev.type]
    return (free, free) if torch_free_too else free


def unload_all_models():
    calls.append("unload_all_models")


def load_models_gpu(models, memory_required=0, hard_memory_preservation=0):
    calls.append(("load_models_gpu", list(models)))


def soft_empty_cache(force=False):
    calls.append("soft_empty_cache")
