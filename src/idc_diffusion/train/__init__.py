"""Stage 4, train: the base model, then fine-tuning Stable Diffusion 2.x on the dataset.

Reads ``results/dataset/`` and the ``train`` section. Writes ``results/base_model/`` (the
``base_model`` rule: ``base_model``, ``hub_snapshot`` for a hub id, ``models``; ``tiny_base``
fits the demo's VAE), the VAE latent cache (the ``latents`` rule: ``encode_latents``,
``latent_cache``), ``results/model/`` (a diffusers pipeline), ``train_log.jsonl``,
``train_summary.json`` and ``checkpoints/`` (the ``train`` rule) and
``results/model/model_card.md`` (the ``model_card`` rule: ``model_card``).

Entry point: :func:`idc_diffusion.train.fine_tune.train` (``launch`` builds the command that
starts it under accelerate), which runs the phases of a run: ``run_setup`` (settings, data,
accelerator, models, optimizer step), ``resume`` (continue from a checkpoint, save one after a
step, stop together), the step loop itself, and ``final_save`` (summary and pipeline). Their
parts: ``objective`` (draws and the denoising loss), ``train_step`` (one optimizer step),
``optimization`` (trained parameters, optimizer, LR schedule), ``train_data`` (batches),
``text_embeddings``, ``attention``, ``lora``, ``ema``, ``loss_weighting``, ``checkpoints``
(checkpoint files, stop signals, time budget) and ``validation`` (image grids during training).
"""
