"""The `omni` command line: synth, train, schedule, consolidate, eval, chat, demo, plan, data, align, export."""
from __future__ import annotations

import argparse
import logging
import os
import sys

from omni.cli.args import out_folder, positive_float, positive_int, wav_path

EPILOG = """examples:
  omni synth --out runs/quickstart/synth
  omni train stages/tiny/2_sft.yaml --out runs/sft data.manifest=runs/quickstart/synth/manifest.yaml steps=50
  omni schedule stages/tiny/schedule.yaml --out runs/quickstart data.manifest=runs/quickstart/synth/manifest.yaml
  omni eval runs/quickstart/final --data runs/quickstart/synth/manifest.yaml --out runs/quickstart
  omni chat runs/quickstart/final --image shape.png --audio tone.wav
  omni export --ckpt runs/quickstart --out exports/omni-tiny [--push-to-hub USER/omni-tiny]
  omni consolidate runs/sft/checkpoints/step-00000300 --out runs/sft/step-300
"""


def _synth(args) -> None:
    from omni.data.synth import SynthConfig, write_corpus
    from omni.speech.synth import SpeechSynthError

    cfg = SynthConfig(out_dir=args.out, train_per_task=args.train_per_task,
                      val_per_task=args.val_per_task, seed=args.seed, voice=args.voice)
    try:
        path = write_corpus(cfg, progress=not args.quiet)
    except SpeechSynthError as e:
        sys.exit(f"omni synth: {e}")
    print(f"manifest: {path}")


def _train(args) -> None:
    from omni.plan import refuse_if_it_cannot_fit
    from omni.train.config import load_stage
    from omni.train.trainer import train_stage

    overrides = [*args.overrides, "log.profile=true"] if args.profile else args.overrides
    cfg = load_stage(args.config, overrides)
    if cfg.init_from == "previous":
        sys.exit(f"{args.config}: init_from: previous only works inside `omni schedule`; "
                 "pass init_from=PATH/TO/final")
    refuse_if_it_cannot_fit(cfg)
    final = train_stage(cfg, args.out, progress=not args.quiet, resume_with_changes=args.resume_with_changes)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"final model: {final}")


def _schedule(args) -> None:
    from omni.plan import refuse_if_it_cannot_fit
    from omni.train.config import load_schedule, load_stage
    from omni.schedule import run_schedule
    from omni.speech_guard import SpeechRegression

    for stage in load_schedule(args.schedule)[1]:  # every stage, before the first one trains
        refuse_if_it_cannot_fit(load_stage(stage, args.overrides))
    try:
        final = run_schedule(args.schedule, args.out, args.overrides, progress=not args.quiet,
                             resume_with_changes=args.resume_with_changes)
    except SpeechRegression as e:
        sys.exit(f"omni schedule: {e}")
    print(f"final model: {final}")


def _eval(args) -> None:
    from omni.eval import evaluate, format_table, not_learned, write_results

    datasets = args.datasets.split(",") if args.datasets else None
    if args.speech:
        return _eval_speech(args, datasets)
    results = evaluate(args.model, args.data, split=args.split, datasets=datasets, limit=args.limit,
                       batch_size=args.batch_size, progress=not args.quiet, device=args.device, dtype=args.dtype)
    print(format_table(results))
    if args.out:
        print(f"wrote {write_results(results, args.out)}")
    if args.min_gain is not None:
        failures = not_learned(results, args.min_gain)
        if failures:
            sys.exit("not learned (accuracy must beat chance and the blanked control by --min-gain):\n  "
                     + "\n  ".join(failures))
        print(f"every task beats chance and its blanked control by >= {args.min_gain}")


def _eval_speech(args, datasets) -> None:
    from omni.speech_eval import evaluate_speech, format_speech_table, write_speech_results

    if args.min_gain is not None:
        sys.exit("omni eval: --min-gain scores text answers; with --speech read the table (spoken vs blanked, chance)")
    results = evaluate_speech(args.model, args.data, split=args.split, datasets=datasets, limit=args.limit,
                              batch_size=args.batch_size, progress=not args.quiet, device=args.device,
                              dtype=args.dtype)
    print(format_speech_table(results))
    if args.out:
        print(f"wrote {write_speech_results(results, args.out)}")


def _chat(args) -> None:
    import torch

    from omni.align.generate import GenerationError
    from omni.errors import SampleError
    from omni.inference import load_media
    from omni.model.generate import LocalGenerator

    if args.max_new_tokens < 1:
        sys.exit(f"--max-new-tokens {args.max_new_tokens}: the answer needs at least 1 new token")
    if args.prompt is not None and not args.prompt.strip():
        sys.exit("--prompt is empty: give a question, or leave --prompt out to chat interactively")
    try:
        media = load_media(args.image, args.video, args.audio)
    except SampleError as e:
        sys.exit(str(e))
    generator = LocalGenerator.load(args.model, batch_size=1, device=args.device, dtype=args.dtype)
    if args.speak and (getattr(generator.model, "talker", None) is None or generator.model.codec is None):
        sys.exit(f"--speak: {args.model} has no talker to speak with; train a speech_out stage on it "
                 "(stages/tiny/3_speech_out.yaml, docs/speech_out.md)")
    augmenter = None
    if args.pas:
        from omni.align.pas import PromptAugmenter

        augmenter = PromptAugmenter.load(args.pas, args.pas_endpoint_model)
    bad_turn = (SampleError, GenerationError, ValueError, torch.OutOfMemoryError)
    history: list[dict] = []
    if args.prompt is not None:
        try:
            _chat_turn(generator, history, args.prompt, media, args.max_new_tokens, augmenter, interactive=False,
                       speak_to=args.speak)
        except bad_turn as e:
            sys.exit(f"--prompt: {_turn_error(e)}")
        return
    turn = 0
    while True:
        try:
            text = input("you> ").strip()
        except EOFError:
            return
        if text in ("/quit", "/exit"):
            return
        if text == "/reset":
            history.clear()
            print("(history cleared; the media go with your next turn)")
            continue
        if not text:
            continue
        turn += 1
        try:
            _chat_turn(generator, history, text, media, args.max_new_tokens, augmenter, interactive=True,
                       speak_to=args.speak)
        except bad_turn as e:  # the turn is dropped, the session and its history go on
            print(f"turn {turn}: {_turn_error(e)}", file=sys.stderr, flush=True)


def _turn_error(e: BaseException) -> str:
    """The error of a turn and what to do about it, on one line."""
    import torch

    from omni.model.generate import ContextError

    text = " ".join(str(e).split())
    if isinstance(e, ContextError) or "exceeds max_length" in text:
        return f"{text}; shorten the turn, lower --max-new-tokens or type /reset to drop the history"
    if "placeholder(s) in the text" in text:
        return (f"{text}; each --image/--video/--audio file needs one placeholder, in the first turn "
                "(left out, it is added in front)")
    if isinstance(e, torch.OutOfMemoryError):
        return f"out of memory ({text[:120]}); lower --max-new-tokens, /reset the history or use a smaller --dtype"
    return text


def _chat_turn(generator, history: list[dict], text: str, media: dict, max_new_tokens: int, augmenter,
               interactive: bool, speak_to: str | None = None) -> None:
    """Answer one user turn, streaming; `history` gains the turn and its answer only when both worked.
    `speak_to`: also write the answer spoken by the model's talker to this WAV file (each turn's
    answer replaces the last)."""
    from omni.inference import with_placeholders

    if augmenter is not None:  # PAS: the complement goes to the model, and is shown
        augmented = augmenter.augment(text)
        print(f"pas> {augmented[len(text):].strip() or '(no complement)'}", flush=True)
        text = augmented
    if not history:  # media belong to the first turn; add placeholders the user left out
        text = with_placeholders(text, {m: len(v) for m, v in media.items()})
    messages = [*history, {"role": "user", "content": text}]
    example = generator.prompt(messages, media, max_new_tokens)
    for note in getattr(example, "notes", ()):  # the one place the processor's notes on the media are shown
        print(f"note: {note}", file=sys.stderr, flush=True)
    if interactive:
        print("omni> ", end="", flush=True)
    answer = ""
    try:
        for piece in generator.stream(example, max_new_tokens):
            answer += piece
            print(piece, end="", flush=True)
    finally:
        print(flush=True)  # the error of a turn that fails while it streams goes on a line of its own
    if speak_to:
        import soundfile

        from omni.model.speech import speak_answer

        wave = speak_answer(generator, messages, media, answer.strip())
        soundfile.write(speak_to, wave, generator.model.codec.sample_rate, subtype="PCM_16")
        print(f"spoken answer: {speak_to}", file=sys.stderr, flush=True)
    history += [messages[-1], {"role": "assistant", "content": answer.strip()}]


def _plan(args) -> None:
    from omni.plan import plan_stage
    from omni.train.config import load_stage
    from omni.train.engines import stage_layout

    cfg = load_stage(args.config, args.overrides)
    engine = args.engine or stage_layout(cfg)
    table = plan_stage(cfg, args.gpus, args.gpu_mem, engine, args.seq_len, args.stats).table()  # checks the name
    print(f"{cfg.name}: {args.gpus} x {args.gpu_mem:g} GiB, engine {engine}")
    print(table)


def _consolidate(args) -> None:
    from omni.train.consolidate import consolidate

    print(f"model folder: {consolidate(args.ckpt, args.out)}")


def build_parser() -> argparse.ArgumentParser:
    from omni.inference import add_placement_arguments

    parser = argparse.ArgumentParser(
        prog="omni", description="Train, evaluate and serve an omni-modal LLM (Baichuan-Omni recipe).",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("synth", help="write the tiny synthetic multimodal corpus (shards + manifest)")
    p.add_argument("--out", required=True, help="output folder (shards/ and manifest.yaml)")
    p.add_argument("--train-per-task", type=positive_int, default=2000)
    p.add_argument("--val-per-task", type=positive_int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--voice", help="also write each answer spoken by espeak-ng in this voice (e.g. en, en-us, en+f3) "
                                   "as KEY.answer.wav, for the speech_out stage; needs `make speech-synth`")
    p.set_defaults(func=_synth)

    overrides_help = "dotted key=value overrides of the stage YAML, e.g. optim.lr=1e-4 steps=100"
    p = sub.add_parser("train", help="run one stage from its YAML config (any method: sft, dpo, rm)")
    p.add_argument("config", help="stage YAML, e.g. stages/tiny/2_sft.yaml or an align config "
                                  "(omni/align/configs/tiny_dpo.yaml); launch with torchrun for several processes")
    p.add_argument("overrides", nargs="*", help=overrides_help)
    p.add_argument("--out", required=True, type=out_folder, help="stage output folder; the model lands in OUT/final")
    p.add_argument("--profile", action="store_true", help="log tokens/s, model TFLOP/s and MFU in metrics.jsonl")
    p.add_argument("--resume-with-changes", action="store_true",
                   help="resume OUT's checkpoint although the config changed (logged; the run is then not exact)")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher
    p.set_defaults(func=_train)

    p = sub.add_parser("schedule", help="run a list of stages, each from the previous one's model, and the "
                                        "speech_eval checks between them")
    p.add_argument("schedule", help="schedule YAML, e.g. stages/tiny/schedule.yaml")
    p.add_argument("overrides", nargs="*", help=overrides_help + " (applied to every stage)")
    p.add_argument("--out", required=True, type=out_folder,
                   help="run folder; one subfolder per stage, final model in OUT/final")
    p.add_argument("--resume-with-changes", action="store_true",
                   help="resume a stage's checkpoint although the config changed (logged; not exact)")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher
    p.set_defaults(func=_schedule)

    p = sub.add_parser("consolidate", help="a checkpoint of any engine (ddp, fsdp2, deepspeed) -> a model folder "
                                           "for export, chat, eval and init_from")
    p.add_argument("ckpt", help="a checkpoint folder, e.g. runs/sft/checkpoints/step-00000300")
    p.add_argument("--out", required=True, type=out_folder, help="the model folder to write (new or empty)")
    p.set_defaults(func=_consolidate)

    p = sub.add_parser("eval", help="held-out accuracy per modality vs chance and blanked media")
    p.add_argument("model", help="model folder (a stage's final/)")
    p.add_argument("--data", required=True, help="manifest YAML")
    p.add_argument("--split", default="val")
    p.add_argument("--datasets", help="comma-separated dataset names (default: the whole split)")
    p.add_argument("--limit", type=positive_int, help="at most this many samples per dataset")
    p.add_argument("--batch-size", type=positive_int, default=32)
    p.add_argument("--out", type=out_folder, help="folder for eval.json")
    p.add_argument("--min-gain", type=float, metavar="G",
                   help="exit 1 unless every task's accuracy beats chance and its blanked control by G")
    p.add_argument("--speech", action="store_true",
                   help="score spoken answers instead (a model with a talker, a corpus with answer.wav): the words "
                        "heard vs chance and a talker with the thinker blanked (eval_speech.json)")
    add_placement_arguments(p)
    p.set_defaults(func=_eval)

    p = sub.add_parser("plan", help="per-GPU memory of a stage on N GPUs, before you launch it")
    p.add_argument("config", help="stage YAML, e.g. stages/7b/2_sft.yaml")
    p.add_argument("overrides", nargs="*", help=overrides_help)
    p.add_argument("--gpus", type=positive_int, default=8, help="data-parallel GPUs (default 8)")
    p.add_argument("--gpu-mem", type=positive_float, default=80, help="GiB per GPU (default 80, an H100/A100-80G)")
    p.add_argument("--engine", default=None,
                   help="memory layout to plan: an engine's, deepspeed's per ZeRO stage (what each shards: "
                        "omni/train/engines.py; an unknown name lists them); default: the stage's own")
    p.add_argument("--seq-len", type=positive_int, default=4096, help="tokens per sample when the stage does not pack")
    p.add_argument("--stats", help="stats.json of `omni data stats` on the stage's data: its datasets' longest sample "
                                   "replaces --seq-len, and only their media kinds are planned")
    p.set_defaults(func=_plan)

    p = sub.add_parser("chat", help="talk to a model in the terminal; the answer streams token by token")
    p.add_argument("model", help="model folder (a stage's final/)")
    p.add_argument("--image", action="append", default=[], help="image file for the first turn (repeatable)")
    p.add_argument("--video", action="append", default=[], help="video file for the first turn (repeatable)")
    p.add_argument("--audio", action="append", default=[], help="audio file for the first turn (repeatable)")
    p.add_argument("--prompt", help="answer this one prompt and exit (default: interactive; /reset forgets the "
                                    "history, /quit leaves)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--pas", metavar="MODEL|URL",
                   help="put a PAS model (`omni align pas train`) or an endpoint serving one in front: each of "
                        "your turns gets its complementary instruction before the model answers (docs/align.md)")
    p.add_argument("--pas-endpoint-model", default="default", help="model name to ask a --pas endpoint for")
    p.add_argument("--speak", metavar="OUT.wav", type=wav_path,
                   help="also write the answer spoken by the model's talker to this WAV file (a model trained "
                        "with a speech_out stage; interactive: each turn's answer replaces the last)")
    add_placement_arguments(p)
    p.set_defaults(func=_chat)

    from omni.cli.align import add_align_commands
    from omni.cli.data import add_data_commands
    from omni.cli.demo import add_demo_command
    from omni.export.writer import add_export_command

    add_data_commands(sub)
    add_align_commands(sub)
    add_export_command(sub)
    add_demo_command(sub)
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # overrides may follow options (`omni train X.yaml --out D steps=5`); argparse leaves them over
    if extra and hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
        args.overrides = list(args.overrides) + extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from omni.config import ConfigError

    try:
        args.func(args)
    except ConfigError as e:
        sys.exit(f"config error: {e}")
    except FileNotFoundError as e:
        sys.exit(f"not found: {e}")


