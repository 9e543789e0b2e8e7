"""Turn the stand-in modules into Forge's variant (call after importing them): dropdowns show names, the
A1111 loaders are stubs, `forge_model_reload` exists, devices come from backend.memory_management."""


def apply():
    from backend import memory_management
    from modules import devices, sd_models

    def checkpoint_tiles(use_short=False):
        return [x.short_title if use_short else x.name for x in sd_models.checkpoints_list.values()]

    def reload_model_weights(sd_model=None, info=None, forced_reload=False):
        pass

    def unload_model_weights(sd_model=None, info=None):
        memory_management.unload_all_models()

    def forge_model_reload():
        return sd_models.model_data.sd_model, False

    sd_models.checkpoint_tiles = checkpoint_tiles
    sd_models.reload_model_weights = reload_model_weights
    sd_models.load_model = lambda checkpoint_info=None, already_loaded_state_dict=None: None
    sd_models.unload_model_weights = unload_model_weights
    sd_models.forge_model_reload = forge_model_reload
    devices.device = memory_management.get_torch_device()
    devices.get_optimal_device_name = lambda: memory_management.get_torch_device().type
