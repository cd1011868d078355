"""omni.align: the text alignment pipeline of the Baichuan Alignment report, on omni models.

    synth.py    a tiny synthetic alignment world (format rules in system messages) for tests and demos
    losses.py   DPO, IPO, length-normalised DPO, SimPO (parity with TRL in tests)
    config.py   the sft / dpo / rm sections of a stage config (align runs are stages with a `method:`)
    objectives/ the objectives omni's one trainer runs, by `method:` name (OBJECTIVES): SFT (every omni
                stage; all / last assistant turns), DPO (reference log-probs precomputable), reward model
    generate.py generators: local omni / transformers models, OpenAI-compatible HTTP endpoints
    judge.py    constraint judges: rules, an LLM (local or endpoint), chains of both
    metrics.py  SysBench CSR/ISR/SSR and CFBench CSR/ISR/PSR with breakdowns
    bench.py    SysBench / CFBench in their official layouts: answer, judge, score, or score --judged files
    pas.py      Prompt Augmentation System: data pipeline, PAS model, `augment(prompt)`
Records and their examples are omni/data/records.py; `omni align ...` is omni/cli/align.py,
the one place that joins alignment and training. docs/align.md explains each stage, its config and metrics.
"""
