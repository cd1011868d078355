"""omni.align: the text alignment pipeline of the Baichuan Alignment report, on omni models.

    synth.py    a tiny synthetic alignment world (format rules in system messages) for tests and demos
    data.py     chat / preference records from JSONL or WebDataset -> processor examples
    losses.py   DPO, IPO, length-normalised DPO, SimPO, Bradley-Terry (parity with TRL in tests)
    config.py   strict align YAML (method: sft | dpo | rm), sharing omni's optim/batch/checkpoint sections
    loop.py     the one align training loop, built from omni/train's optimizer, scheduler and checkpoints
    methods.py  SFT (all / last assistant turns), DPO (reference log-probs precomputable), reward model
    generate.py generators: local omni / transformers models, OpenAI-compatible HTTP endpoints
    judge.py    constraint judges: rules, an LLM (local or endpoint), chains of both
    metrics.py  SysBench CSR/ISR/SSR and CFBench CSR/ISR/PSR with breakdowns
    bench.py    SysBench / CFBench in their official layouts: answer, judge, score, or score --judged files
    pas.py      Prompt Augmentation System: data pipeline, PAS model, `augment(prompt)`
    cli.py      `omni align ...` (add_align_commands)
docs/align.md explains each stage, its config and metrics.
"""
