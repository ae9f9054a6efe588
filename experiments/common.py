"""The settings every experiment shares; an experiment file overrides what differs."""

import ml_collections


def base_config() -> ml_collections.ConfigDict:
  """Defaults of the trainer; each field's comment says what it does."""
  config = ml_collections.ConfigDict()
  config.seed = 0

  config.data = ml_collections.ConfigDict()
  config.data.dataset = "synthetic"  # or "iam_ondb"
  config.data.data_dir = ml_collections.FieldReference(None, field_type=str)
  config.data.manual_dir = ml_collections.FieldReference(None, field_type=str)
  config.data.train_split = "train"
  config.data.eval_split = "validation"  # early stopping watches this split (selection_metric)
  # Scored once training ends, with the best epoch's parameters; None: no test split.
  config.data.test_split = ml_collections.FieldReference(None, field_type=str)
  # Per-split example caps (0 = all): tiny variants and quick sweeps take a prefix.
  config.data.train_limit = 0
  config.data.eval_limit = 0
  # A line with NaN/inf points, no ink, no text, or fewer feature frames than CTC needs to align
  # its text (coarse resampling): "error" names it and stops before training;
  # "skip" leaves it out, counted in summary.json and the plan print.
  config.data.bad_examples = "error"
  # Size of the generated set when dataset == "synthetic".
  config.data.synthetic = ml_collections.ConfigDict({"num_train": 5000, "num_eval": 500, "seed": 0})
  config.data.features = ml_collections.ConfigDict(
    {
      "normalize": True,
      "resample_spacing": ml_collections.FieldReference(None, field_type=float),
      "time_deltas": False,
    }
  )

  config.bucketing = ml_collections.ConfigDict()
  config.bucketing.strategy = "optimal"  # none | uniform | quantile | fixed | optimal | auto
  config.bucketing.num_buckets = 8  # K; the largest K for auto
  config.bucketing.upper_bounds = ml_collections.FieldReference(None, field_type=tuple)  # fixed
  config.bucketing.batch_size = 32  # global sequences per step; 0 when max_tokens is used
  config.bucketing.max_tokens = 0  # global padded-token budget per step (0 = fixed batch size)
  config.bucketing.round_to = 8
  config.bucketing.overflow = "error"  # error | drop | truncate
  # Cost model for auto: seconds per step (alpha), per padded timestep (gamma), per padded token
  # (beta) and per compiled bucket (kappa). None: measured before planning, on this model and
  # these devices (train.measure_cost_model: two or three train steps compiled one after another
  # and timed), and kept in the workdir's cost_model.json for a resumed run.
  for field in ("alpha", "gamma", "beta", "kappa"):
    config.bucketing[field] = ml_collections.FieldReference(None, field_type=float)

  config.model = ml_collections.ConfigDict()
  config.model.num_layers = 3
  config.model.hidden_size = 128
  config.model.bidirectional = True
  config.model.dropout_rate = 0.2
  config.model.input_projection_size = ml_collections.FieldReference(None, field_type=int)
  # auto (the fused Pallas kernel for bfloat16 models on a GPU, where it measured faster; the scan
  # elsewhere: models.factory.KERNEL_DTYPES) | scan | pallas
  config.model.lstm_impl = "auto"
  # Scan steps per loop iteration; 0 = the backend's measured best (8 on a GPU, 1 on the CPU).
  config.model.unroll = 0
  # Launch parameters of the Pallas recurrence (models.lstm_kernel.KernelConfig); None = the
  # fastest measured on an H200 for the model's dtype (models.factory.KERNEL_LAUNCH: float32
  # weights re-read at every frame, bfloat16 ones held on chip with the next frame prefetched).
  config.model.kernel = ml_collections.ConfigDict(
    {
      "batch_tile": ml_collections.FieldReference(None, field_type=int),
      "num_warps": ml_collections.FieldReference(None, field_type=int),
      "weights_resident": ml_collections.FieldReference(None, field_type=bool),
      "num_stages": ml_collections.FieldReference(None, field_type=int),
      "prefetch": ml_collections.FieldReference(None, field_type=bool),
      "approx_activations": ml_collections.FieldReference(None, field_type=bool),
    }
  )
  config.model.dtype = "float32"

  # The CTC loss: auto (the fused Pallas kernel on a GPU, optax elsewhere) | optax | pallas, and
  # the kernel's launch parameters (models.ctc_kernel.ctc_loss_kernel), the fastest measured on an
  # H200: 0.59 ms for loss and gradient at B = 32, T = 608 against optax's 16.5
  # (results/benchmark_step_gpu_defaults.md; 0.55 against 17.6 in the first run).
  config.ctc = ml_collections.ConfigDict({"impl": "auto", "batch_tile": 1, "num_warps": 2})

  config.optimizer = ml_collections.ConfigDict()
  config.optimizer.learning_rate = 1e-3
  config.optimizer.warmup_steps = 200
  config.optimizer.schedule = "cosine"  # cosine | constant (after warm-up)
  config.optimizer.grad_clip_norm = 5.0

  config.num_epochs = 50
  config.patience = 5  # epochs without a better selection metric before stopping
  # The validation metric that picks the best epoch (`checkpoints/best`, the test split's
  # parameters) and that patience waits on: val_loss (the paper's) | val_cer.
  config.selection_metric = "val_loss"
  config.max_steps = 0  # stop after this many global steps (0 = no cap)
  # Stop at the next step boundary with a checkpoint after this many minutes of wall time since
  # the start (0 = no cap); the same command resumes, with the clock started again.
  config.max_minutes = 0.0
  config.checkpoint_every_steps = 200  # global steps between mid-epoch checkpoints
  config.eval_batch_size = 64
  config.progress_bar = True
  # overlap: train once the first scheduled bucket is compiled, the rest compile in the background;
  # parallel: compile every step on a thread pool first; sequential: one at a time first.
  config.compile_mode = "overlap"
  # Threads compiling the steps (overlap, parallel); 0: one per CPU core. Fewer may compile faster
  # where each compile is itself parallel or times kernels on the one GPU (XLA's autotuning).
  config.compile_threads = 0
  # Persistent compilation cache; None: $JAX_COMPILATION_CACHE_DIR, else bucketed-rnn/jax in
  # $XDG_CACHE_HOME or ~/.cache; "": off.
  config.compilation_cache_dir = ml_collections.FieldReference(None, field_type=str)

  # Multi-host: jax.distributed.initialize() arguments; leave empty on one host.
  config.distributed = ml_collections.ConfigDict()
  config.distributed.initialize = False
  config.distributed.coordinator_address = ml_collections.FieldReference(None, field_type=str)
  config.distributed.num_processes = ml_collections.FieldReference(None, field_type=int)
  config.distributed.process_id = ml_collections.FieldReference(None, field_type=int)
  # Locked, as `--config` locks it: a misspelt field set from Python (`config.max_step = 3`) is
  # an error naming the field it meant, not a field the trainer never reads.
  config.lock()
  return config


def tiny(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Shrinks any experiment to a couple of CPU-seconds of steps, for the tests."""
  config.data.train_limit = 48
  config.data.eval_limit = 16
  config.bucketing.num_buckets = 2
  config.bucketing.batch_size = 8
  config.eval_batch_size = 8
  config.model.num_layers = 1
  config.model.hidden_size = 16
  config.model.unroll = 1
  config.optimizer.warmup_steps = 2
  config.num_epochs = 2
  config.checkpoint_every_steps = 4
  config.progress_bar = False
  return config
