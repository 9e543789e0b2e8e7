"""modules/devices.py: the device the webui computes on (--use-cpu all here) and torch_gc."""
import torch

cpu = torch.device("cpu")
device = torch.device("cpu")
gc_calls = 0  # stand-in only


def get_optimal_device_name():
    return "cuda" if torch.cuda.is_available() else "cpu"


def get_optimal_device():
    return torch.device(get_optimal_device_name())


def torch_gc():
    global gc_calls
    gc_calls += 1
