"""Interchange with diffusers: our U-Net and processes as diffusers' folders, and back.

- :mod:`.unet`: the U-Net's config and weights as ``UNet2DModel``'s (one name map, both ways);
- :mod:`.scheduler`: a process as a scheduler config, a DDPM / DDIM scheduler config as ours;
- :mod:`.folder`: write a pipeline folder (``python -m diffusion.export``), build a module from
  one (``ckpt=diffusers:<folder or hub id>``, ``module.init_from=diffusers:<…>``).

diffusers itself is never imported: folders are JSON and safetensors (``pip install -e
'.[diffusers]'`` brings safetensors and huggingface_hub, and diffusers for the tests that run
its pipelines on our exports).
"""
