"""Our checkpoints: the on-disk format, saving, loading and reading them, for training, conversion
and evaluation alike. This package imports none of ``training``, ``conversion`` or ``eval``; they
import it.

Layout of a checkpoints directory (``<run_dir>/checkpoints`` unless ``checkpoint.save_dir`` says
otherwise)::

    latest                    text: name of the newest *complete* checkpoint, e.g. "iter_0000040"
    latest_checkpointed_iteration.txt   the same step as a bare number ("40"), for Megatron-LM's tools
    iter_0000040/
        model_optim/          dist_checkpointing: {"model" | "model0", …, "optimizer"}, layout-free
        common.pt             rank 0: step, consumed samples, scheduler, model config, extra state
        rng/rank_00003.pt     each rank's Python / NumPy / torch / megatron-tracker RNG states
        layout.json           the world / TP / PP / DP sizes that wrote it, and the writing run's id
        …                     files a stage writes itself (``write_extra_files``)
    iter_0000050.partial/     a save in progress (or killed): never read, removed by the next save
    iter_0000040.next/        a complete re-save of step 40 moving in (see ``save``)
    iter_0000030.old/         a checkpoint being deleted (pruned, or replaced by a re-save)

Modules:

- ``layout``: the names above; ``read_latest`` and ``resolve_checkpoint`` (an ``iter_N``, a
  checkpoints directory or a run directory -> the ``iter_N`` meant).
- ``metadata``: what a checkpoint says about itself, typed (``CheckpointInfo``:
  step, model config, run config, soft-mask state); ``common.pt`` and ``layout.json``; the
  model-shape check.
- ``sharded_state``: the model's (and optimizer's) dist_checkpointing state dict; weights-only
  ``save_model`` / ``load_model``.
- ``rng``: each rank's random-number state.
- ``safe_load``: every read of a checkpoint's pickles, under an allow-list: no code runs.
- ``save``: the collective save and its rename protocol (``latest`` always names a complete
  checkpoint; ``SAVE_POINTS`` name the moments a test kills it at).
- ``load``: the collective load under any layout (model, optimizer, LR schedule, RNG).
- ``standalone``: outside a training run: load one's weights in one process, or write a new
  checkpoint at a chosen TP/PP (what ``conan-convert from-hf`` writes).

Every file is written through :mod:`megatron_conan.atomic_write`, the only module that renames.
"""
