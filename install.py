"""Run by A1111 / Forge at every launch (and after "Install from URL"): installs the runtime packages that
lib_rebasin needs and the webui lacks, through the webui's own pip helper (which honours --skip-install and
INDEX_URL).  Never torch: the webui brings the torch build that matches its GPU."""
import launch

# import name -> pip requirement; all of them are usually present already (the webui itself needs them)
REQUIREMENTS = {
    "safetensors": "safetensors>=0.4",
    "numpy": "numpy",
    "scipy": "scipy",
    "tqdm": "tqdm",
}

for module, requirement in REQUIREMENTS.items():
    if not launch.is_installed(module):
        launch.run_pip(f"install {requirement}", f"{requirement} for Re-Basin Merge")
