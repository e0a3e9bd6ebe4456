"""The `lstm-jax` subcommands, one module per group (`lstm_jax/cli.py` dispatches): training
(train, prepare), sampling (sample, export), evaluation (eval), tools (plot, bench); `common` holds
the flags and error handling they share. Nothing else in the package parses flags."""

# command -> (module in lstm_jax.commands, function, one line of help)
COMMANDS = {
    "train": ("training", "train", "train a model (resumes from the workdir's latest checkpoint)"),
    "sample": ("sampling", "sample", "generate text from a trained workdir"),
    "eval": ("evaluation", "evaluate", "bits per char of a trained model on a whole text (default: its held-out split)"),
    "prepare": ("training", "prepare", "encode a corpus once into memory-mappable train/val arrays"),
    "plot": ("tools", "plot", "draw a run's loss curves (metrics.jsonl) to a PNG"),
    "bench": ("tools", "bench", "measure a config's train step (chars/s, FLOP/s, MFU, vs PyTorch) and the sampler here"),
    "export": ("sampling", "export", "write the sampler as a jax.export program (cpu, cuda, tpu) with a jax+numpy loader"),
}
