# Two entry points (README): `make quickstart` and `make test`. Each sets up .venv on first use.
PYTHON ?= python3
VENV   ?= .venv
OUT    ?= runs/quickstart
# the question-answering val sets, one per modality (captions are alignment data)
EVAL_SETS = image_colour,video_colour_change,audio_note,image_audio_side,text_arith
BIN     = $(VENV)/bin
STAMP   = $(VENV)/.omni-installed

.PHONY: setup quickstart test lock clean

setup: $(STAMP)

$(STAMP): requirements.lock pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -r requirements.lock
	$(BIN)/python -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $(STAMP)

# Synthetic corpus -> tiny two-stage schedule -> held-out eval table, all under $(OUT).
quickstart: setup
	$(BIN)/omni synth --out $(OUT)/synth
	$(BIN)/omni schedule stages/tiny/schedule.yaml --out $(OUT) data.manifest=$(OUT)/synth/manifest.yaml
	$(BIN)/omni eval $(OUT)/final --data $(OUT)/synth/manifest.yaml --out $(OUT) --datasets $(EVAL_SETS)

test: setup
	$(BIN)/python -m pytest -q tests

lock:
	$(BIN)/python -m pip freeze --exclude-editable | sed '1i # Exact versions the CPU install is tested with (pip freeze of `make setup`). Regenerate with `make lock`.' > requirements.lock

clean:
	rm -rf runs .pytest_cache
