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

    class FakeInitialModel:
        """Forge's placeholder before the first load."""
        cond_stage_model = None
        chunk_length = 75

    class ForgeModel:
        """Stand-in only: a loaded Forge model (it has forge_objects)."""
        def __init__(self, info):
            self.sd_checkpoint_info = info
            self.forge_objects = object()

    def forge_model_reload():
        data = sd_models.model_data
        current = str(data.forge_loading_parameters)
        if data.forge_hash == current:
            return data.sd_model, False
        memory_management.calls.append("forge_model_reload")
        data.sd_model = ForgeModel(data.forge_loading_parameters.get("checkpoint_info"))
        data.forge_hash = current
        return data.sd_model, True

    sd_models.checkpoint_tiles = checkpoint_tiles
    sd_models.reload_model_weights = reload_model_weights
    sd_models.load_model = lambda checkpoint_info=None, already_loaded_state_dict=None: None
    sd_models.unload_model_weights = unload_model_weights
    sd_models.forge_model_reload = forge_model_reload
    sd_models.FakeInitialModel = FakeInitialModel
    sd_models.ForgeModel = ForgeModel  # stand-in only
    sd_models.model_data.sd_model = FakeInitialModel()
    sd_models.model_data.forge_loading_parameters = {}
    sd_models.model_data.forge_hash = ""
    devices.device = memory_management.get_torch_device()
    devices.get_optimal_device_name = lambda: memory_management.get_torch_device().type
