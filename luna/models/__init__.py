"""Model loading shared by every stage, offline: SDXL pipelines and text encoders, open_clip vision
towers, fingerprints, and the tiny preset. Import the submodules directly:

    from luna.models.sdxl import load_sdxl, load_text_encoders, encode_prompt, detect_architecture
    from luna.models.vision import load_vision
    from luna.models.fingerprint import file_fingerprint, te_fingerprint
    from luna.models.tiny import write_checkpoints, write_vision, tiny_pipeline
"""
