"""How the rotation-trick quantizer gets into other codebases' models.

- ``ldm``: latent-diffusion's ``VQModel`` subclassed (``RotationVQModel``, ``GumbelVQModel``), Table 3;
- ``vitvqgan``: enhancing-transformers' ``ViTVQ`` subclassed (``RotationViTVQ``), its loss and ImageNet data, Table 4;
- ``swap``: ``swap_quantizers`` for a model you already have (diffusers, taming, latent-diffusion, enhancing);
- ``diffusers_vq``: a diffusers ``VQModel`` to train with the trick (built-in sizes, a resumable stream, pictures);
- ``losses``: taming's loss without LPIPS at weight 0, with one-line errors for missing weights;
- ``lightning_compat``: the Lightning-1.x loop semantics both subclasses keep under Lightning 2;
- ``released``: the authors' released Table 3 configs translated onto these classes;
- ``upstream``: importing the upstream trees, with one clear error when a tree is absent.

Nothing is imported here: ``ldm`` and ``vitvqgan`` need their upstream tree on ``sys.path``.
"""
