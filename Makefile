# Two entry points (README): `make quickstart` and `make test`. Each sets up .venv on first use.
PYTHON ?= python3
VENV   ?= .venv
OUT    ?= runs/quickstart
# the question-answering val sets, one per modality (captions are alignment data)
EVAL_SETS = image_colour,video_colour_change,audio_note,image_audio_side,text_arith
# the quickstart fails unless every task beats chance and its blanked control by this much
MIN_GAIN = 0.5
BIN     = $(VENV)/bin
STAMP   = $(VENV)/.omni-installed
# lmms-eval needs av<16 (omni: 18) and python-dateutil<3 (ours: 4), so it gets its own environment with omni in it (docs/eval.md)
EVAL_VENV  = .venv-eval
EVAL_STAMP = $(EVAL_VENV)/.omni-installed
LMMS_EVAL  = 0.7.3

# pip installs without byte-compiling (half its time: the venvs hold ~22,000 .py files, a run imports a
# sixth of them); Python compiles a module when it is first imported and keeps the .pyc in the venv, even
# where the environment sets PYTHONDONTWRITEBYTECODE (docs/benchmarks.md, "Quickstart").
unexport PYTHONDONTWRITEBYTECODE

BROWSER = /usr/bin/chromium
ESPEAK  = /usr/bin/espeak-ng
FFMPEG  = /usr/bin/ffmpeg

.PHONY: setup eval-env browser speech-synth quickstart test lock lock-eval clean

setup: $(STAMP)

$(STAMP): requirements.lock pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --no-compile -r requirements.lock
	$(BIN)/python -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $(STAMP)

# requirements-eval.lock (requirements.lock's versions but av and python-dateutil, plus lmms-eval); omni without its pins.
eval-env: $(EVAL_STAMP)

$(EVAL_STAMP): requirements-eval.lock pyproject.toml
	test -x $(EVAL_VENV)/bin/python || $(PYTHON) -m venv $(EVAL_VENV)
	$(EVAL_VENV)/bin/python -m pip install --quiet --no-compile -r requirements-eval.lock
	$(EVAL_VENV)/bin/python -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $(EVAL_STAMP)

# Debian's Chromium drives the demo's browser tests (Playwright's own browser download does not
# work offline); without it those tests skip and say why. Gradio encodes the demo's streamed speech
# with the ffmpeg CLI (AAC for the browser); without it the demo does not speak and says why.
browser:
	@test -x $(BROWSER) || (apt-get update -qq && apt-get install -y -qq chromium >/dev/null) \
		|| echo "warning: could not install Debian's chromium; the browser tests will be skipped"
	@test -x $(FFMPEG) || (apt-get update -qq && apt-get install -y -qq --no-install-recommends ffmpeg >/dev/null) \
		|| echo "warning: could not install Debian's ffmpeg; the demo will not stream speech"

# Debian's espeak-ng speaks the tiny world's words for the speech-out codec and talker (omni/speech/synth.py);
# without it those tests fail with a line that says to run `make speech-synth`.
speech-synth:
	@test -x $(ESPEAK) || (apt-get update -qq && apt-get install -y -qq espeak-ng >/dev/null) \
		|| echo "warning: could not install Debian's espeak-ng; the speech-out tests will fail until it is installed"

# Synthetic corpus -> tiny two-stage schedule -> held-out eval table, all under $(OUT).
quickstart: setup
	$(BIN)/omni synth --out $(OUT)/synth
	$(BIN)/omni schedule stages/tiny/schedule.yaml --out $(OUT) data.manifest=$(OUT)/synth/manifest.yaml
	$(BIN)/omni eval $(OUT)/final --data $(OUT)/synth/manifest.yaml --out $(OUT) --datasets $(EVAL_SETS) --min-gain $(MIN_GAIN)

test: setup eval-env browser speech-synth
	$(BIN)/python -m pytest -q tests

# Resolve pyproject's pins (+ test, track and bench extras) in a throw-away venv and record every version.
lock:
	rm -rf .venv-lock && $(PYTHON) -m venv .venv-lock
	.venv-lock/bin/python -m pip install --quiet -e '.[test]'
	(echo '# Exact versions the CPU install is tested with. Regenerate with `make lock`.'; \
	 .venv-lock/bin/python -m pip freeze --exclude-editable) > requirements.lock
	rm -rf .venv-lock

# The eval environment's versions: requirements.lock's, except av and python-dateutil, which lmms-eval resolves.
lock-eval:
	rm -rf .venv-lock && $(PYTHON) -m venv .venv-lock
	grep -v -E '^(av|python-dateutil)==' requirements.lock > .venv-lock/base.txt
	.venv-lock/bin/python -m pip install --quiet -r .venv-lock/base.txt lmms-eval==$(LMMS_EVAL)
	(echo '# Exact versions of the lmms-eval environment (make eval-env). Regenerate with `make lock-eval`.'; \
	 .venv-lock/bin/python -m pip freeze --exclude-editable) > requirements-eval.lock
	rm -rf .venv-lock

clean:
	rm -rf runs .pytest_cache
