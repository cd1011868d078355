"""omni.align: the text alignment pipeline of the Baichuan Alignment report, on omni models.

    synth.py    a tiny synthetic alignment world (format rules in system messages) for tests and demos
    data.py     chat / preference records from JSONL or WebDataset (stage samples too) -> processor examples
    losses.py   DPO, IPO, length-normalised DPO, SimPO, Bradley-Terry (parity with TRL in tests)
    config.py   the sft / dpo / rm sections of a stage config (align runs are stages with a `method:`)
    methods.py  the objectives omni's one trainer runs: SFT (every omni stage; all / last assistant
                turns), DPO (reference log-probs precomputable), reward model
    generate.py generators: local omni / transformers models, OpenAI-compatible HTTP endpoints
    judge.py    constraint judges: rules, an LLM (local or endpoint), chains of both
    metrics.py  SysBench CSR/ISR/SSR and CFBench CSR/ISR/PSR with breakdowns
    bench.py    SysBench / CFBench in their official layouts: answer, judge, score, or score --judged files
    pas.py      Prompt Augmentation System: data pipeline, PAS model, `augment(prompt)`
    cli.py      `omni align ...` (add_align_commands)
docs/align.md explains each stage, its config and metrics.
"""
