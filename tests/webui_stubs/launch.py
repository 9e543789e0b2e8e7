"""launch.py as an extension's install.py sees it: is_installed(package) and run_pip(command, desc)."""
import importlib.metadata
import importlib.util

installed = set()    # stand-in only: packages that count as installed
pip_commands = []    # stand-in only: what run_pip was asked to do


def is_installed(package):
    if package in installed:
        return True
    try:
        importlib.metadata.version(package)
        return True
    except importlib.metadata.PackageNotFoundError:
        return importlib.util.find_spec(package) is not None


def run_pip(command, desc=None, live=False):
    pip_commands.append(command)
