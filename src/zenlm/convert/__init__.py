"""Conversion between zenlm run directories and other formats (Hugging Face ``transformers`` checkpoints).

    from zenlm.convert import import_hf, export_hf
    run = import_hf("path/to/hf-model", "runs/imported")     # config.json + safetensors -> run directory
    export_hf("runs/my-gpt", "out/hf-model")                # run directory -> config.json + model.safetensors

See :mod:`zenlm.convert.hf` for the supported architectures and the weight maps.
"""

from __future__ import annotations

from zenlm.convert.hf import SUPPORTED_ARCHITECTURES, download_from_hub, export_hf, import_hf

__all__ = ["import_hf", "export_hf", "download_from_hub", "SUPPORTED_ARCHITECTURES"]
