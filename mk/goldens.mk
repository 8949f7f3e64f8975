# `make goldens`: reference outputs of fer's real Keras model for the PyTorch port's parity test
# (tests/test_fer_backbone.py). Run it once, then commit tests/golden/fer_minixception.npz (~100 KB).
#
# Needs: the sample media (make sample-data) and, only for this target, a throwaway TensorFlow venv
# outside the repo (TFENV, created on first use: tensorflow-cpu + tf-keras, ~2.2 GB, a few minutes to
# download; afterwards the target runs in ~10 s). Nothing in the project imports TensorFlow.
TFENV        ?= /tmp/tfenv
TF_PIP       ?= tensorflow-cpu==2.21.0 tf-keras==2.21.0 h5py
GOLDEN_IN    := data/goldens/fer_inputs.npz
GOLDEN_OUT   := tests/golden/fer_minixception.npz

.PHONY: goldens

goldens: $(STAMP) sample-data $(TFENV)/.installed
	$(PY) scripts/make_goldens.py faces --samples $(SAMPLES) --out $(GOLDEN_IN)
	TF_CPP_MIN_LOG_LEVEL=2 $(TFENV)/bin/python scripts/make_goldens.py reference --inputs $(GOLDEN_IN) \
		--samples $(SAMPLES) --out $(GOLDEN_OUT)

$(TFENV)/.installed:
	python3 -m venv $(TFENV)
	$(TFENV)/bin/python -m pip install -q --upgrade pip
	$(TFENV)/bin/python -m pip install -q $(TF_PIP)
	touch $@
