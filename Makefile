# moe-ep build.
#
#   make            build the library, the program and the tests into build/
#   make run        install missing packages, build, and run the default layer
#   make test       install missing packages, build, and run the test suite
#   make examples   build the numbered programs of examples/ into
#                   build/examples/ (make and make check build them too)
#   make walkthrough  rewrite docs/walkthrough.md from docs/walkthrough.md.in
#                   with the output of the commands it names
#   make sanitize   build into build-san/ with ASan+UBSan and run the suite
#   make bench      run the benchmark and rewrite docs/BENCHMARKS.md
#   make bench-mpi  measure the forward and the all-to-all over MPI and on
#                   the rings at 2 and 4 ranks, into docs/BENCHMARKS.md
#   make bench-peers  install PyTorch and run `moe-ep bench --peers`, which
#                   adds a PyTorch EP layer and Open MPI's MPI_Alltoallv
#                   to the report; it prints the report and writes
#                   $(BUILD)/bench-peers.md, not docs/BENCHMARKS.md
#   make MPI=0 ...  build without the MPI transport (it is built when
#                   Open MPI's mpicc is on the PATH)
#   make golden     install PyTorch and recompute the reference outputs of
#                   the tiny layers in data/layers
#
# No fast-math flag is used anywhere: the golden check compares bits.
# -ffp-contract=off keeps the compiler from fusing a*b+c differently at
# different inlining sites, which would break bitwise equality between the
# golden path and the ranks.

BUILD    ?= build
CC       ?= cc
PKGS     := openblas libcjson
CFLAGS   ?= -O2 -g
ALL_CFLAGS := $(CFLAGS) -std=gnu11 -Wall -Wextra -Werror -ffp-contract=off -pthread \
            -Iinclude $(shell pkg-config --cflags $(PKGS) 2>/dev/null)
LDLIBS   := $(shell pkg-config --libs $(PKGS) 2>/dev/null) -lm -lrt -pthread
TEST_LIBS := $(shell pkg-config --libs criterion 2>/dev/null)

LIB_SRC  := $(filter-out src/main.c,$(wildcard src/*.c))
LIB_OBJ  := $(LIB_SRC:src/%.c=$(BUILD)/obj/%.o)
LIB      := $(BUILD)/libmoe-ep.a
BIN      := $(BUILD)/moe-ep
TEST_SRC := $(wildcard tests/test_*.c)
TEST_BIN := $(TEST_SRC:tests/%.c=$(BUILD)/tests/%)
EXAMPLE_SRC := $(wildcard examples/*.c)
EXAMPLE_BIN := $(EXAMPLE_SRC:examples/%.c=$(BUILD)/examples/%)

# The MPI transport. Only the files in MPI_OBJ include mpi.h; with MPI=1
# every binary links libmpi. $(BUILD)/mpi-config records the setting, so
# that switching between MPI=1 and MPI=0 rebuilds those files.
MPI ?= $(if $(shell command -v mpicc 2>/dev/null),1,0)
ifeq ($(MPI),1)
MPI_CFLAGS := $(shell mpicc --showme:compile 2>/dev/null)
MPI_LIBS   := $(shell mpicc --showme:link 2>/dev/null)
ifeq ($(MPI_LIBS),)
$(error `mpicc --showme:link` failed: the MPI transport is built with Open MPI's mpicc; build with make MPI=0 to leave it out)
endif
LDLIBS   += $(MPI_LIBS)
endif
MPI_OBJ  := $(BUILD)/obj/transport_mpi.o $(BUILD)/obj/bench_mpi.o
MPI_TEST_BIN := $(BUILD)/tests/mpi/transport_check

.PHONY: all deps run test check sanitize bench bench-mpi golden clean examples FORCE
all: $(BIN) $(TEST_BIN) $(MPI_TEST_BIN) $(EXAMPLE_BIN)

$(BUILD)/obj/%.o: src/%.c $(wildcard include/*.h) | $(BUILD)/obj
	$(CC) $(ALL_CFLAGS) -c $< -o $@

$(LIB): $(LIB_OBJ)
	$(AR) rcs $@ $^

$(BIN): src/main.c $(LIB)
	$(CC) $(ALL_CFLAGS) $< $(LIB) $(LDLIBS) -o $@

$(BUILD)/tests/%: tests/%.c $(wildcard tests/*.h) $(LIB) | $(BUILD)/tests
	$(CC) $(ALL_CFLAGS) $< $(LIB) $(TEST_LIBS) $(LDLIBS) -o $@

$(MPI_OBJ): ALL_CFLAGS += -DMOE_HAVE_MPI=$(MPI) $(MPI_CFLAGS)
$(MPI_OBJ): $(BUILD)/mpi-config

$(BUILD)/mpi-config: FORCE | $(BUILD)/obj
	@echo 'MPI=$(MPI) $(MPI_CFLAGS) $(MPI_LIBS)' | cmp -s - $@ || \
	    echo 'MPI=$(MPI) $(MPI_CFLAGS) $(MPI_LIBS)' > $@

# Built with MPI=0 too, where it checks that --transport mpi is rejected.
$(MPI_TEST_BIN): tests/mpi/transport_check.c $(LIB) | $(BUILD)/tests/mpi
	$(CC) $(ALL_CFLAGS) $< $(LIB) $(LDLIBS) -o $@

examples: $(EXAMPLE_BIN)

$(BUILD)/examples/%: examples/%.c $(LIB) | $(BUILD)/examples
	$(CC) $(ALL_CFLAGS) $< $(LIB) $(LDLIBS) -o $@

$(BUILD)/obj $(BUILD)/tests $(BUILD)/tests/mpi $(BUILD)/examples:
	mkdir -p $@

deps:
	tools/install-deps.sh

# The reference needs Debian's python3-torch, which the default python3 of
# some machines cannot import, hence /usr/bin/python3. The minimum gap of
# 1e-5 between the K-th and (K+1)-th selection score is 100 times the
# float32 rounding of the scores, so moe-ep must select the same experts.
GOLDEN_LAYERS := $(patsubst %/config.json,%,$(wildcard data/layers/*/config.json))
golden:
	tools/install-deps.sh python3-torch python3-numpy
	/usr/bin/python3 tools/torch_reference.py --min-gap 1e-5 $(GOLDEN_LAYERS)

run: deps
	$(MAKE) $(BIN)
	$(BIN) run

# Runs every test binary; Criterion prints a summary line for each.
# tests/test_examples.c runs the examples.
check: $(BIN) $(TEST_BIN) $(MPI_TEST_BIN) $(EXAMPLE_BIN)
	tools/run-tests.sh $(BUILD)

test: deps
	$(MAKE) check

# make check fails when docs/walkthrough.md differs from a fresh generation
# (tests/walkthrough.sh, run by tools/run-tests.sh).
.PHONY: walkthrough
walkthrough: $(BIN) $(EXAMPLE_BIN)
	sh tools/walkthrough.sh generate $(BUILD) docs/walkthrough.md.in docs/walkthrough.md

sanitize: deps
	ASAN_OPTIONS=detect_leaks=1 LSAN_OPTIONS=suppressions=$(CURDIR)/tools/lsan.supp \
	UBSAN_OPTIONS=print_stacktrace=1 \
	$(MAKE) BUILD=build-san \
	    CFLAGS="-O1 -g -fno-omit-frame-pointer -fsanitize=address,undefined -fno-sanitize-recover=undefined" \
	    check

bench: deps
	$(MAKE) $(BIN)
	$(BIN) bench --markdown docs/BENCHMARKS.md

# mpirun rejects running as root unless two variables confirm it.
MPIRUN := $(if $(filter 0,$(shell id -u)),OMPI_ALLOW_RUN_AS_ROOT=1 \
          OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1) mpirun --oversubscribe
# Each job measures the forward and the all-to-all over MPI and on the
# rings. Their reports replace the side-by-side sections at the end of
# docs/BENCHMARKS.md, with every heading one level lower, and `make bench`
# keeps those sections when it rewrites the rest of the file.
bench-mpi: deps
	$(MAKE) $(BIN)
	$(MPIRUN) -np 2 $(BIN) bench --transport mpi --markdown $(BUILD)/bench-mpi-2.md
	$(MPIRUN) -np 4 $(BIN) bench --transport mpi --markdown $(BUILD)/bench-mpi-4.md
	sed '/^## Shared memory and MPI side by side/,$$d' docs/BENCHMARKS.md \
	    >$(BUILD)/BENCHMARKS.md
	sed 's/^#/##/' $(BUILD)/bench-mpi-2.md $(BUILD)/bench-mpi-4.md \
	    >>$(BUILD)/BENCHMARKS.md
	mv $(BUILD)/BENCHMARKS.md docs/BENCHMARKS.md

# bench/torch_ep.py runs under /usr/bin/python3, which has Debian's
# python3-torch; mpirun comes with the default packages.
.PHONY: bench-peers
bench-peers: deps
	tools/install-deps.sh python3-torch python3-numpy
	$(MAKE) $(BIN)
	$(BIN) bench --peers --markdown $(BUILD)/bench-peers.md

clean:
	rm -rf build build-san build-fuzz build-tsan

# ---- fuzzing, ThreadSanitizer, soak and large tests ---------------------
#
#   make fuzz        build the libFuzzer targets of tests/fuzz with clang,
#                    ASan and UBSan into build-fuzz/ and run each for
#                    FUZZ_SECONDS; new inputs go to build-fuzz/corpus/TARGET
#                    and crashing inputs to build-fuzz/crashes/
#   make fuzz-ci     run each target on its seed corpus and then on
#                    mutated inputs, FUZZ_RUNS in all, with a fixed seed
#   make tsan        build the thread-mode ring and all-to-all checks with
#                    ThreadSanitizer into build-tsan/ and run them
#   make soak        stream SOAK_RECORDS records with checksums between two
#                    processes through one ring
#   make test-large  run tests/large, buffers beyond 2^31 and 2^32 bytes:
#                    about 11 GiB of memory and 1 minute; not run in CI

FUZZ_BUILD    ?= build-fuzz
FUZZ_CC       ?= clang
FUZZ_TARGETS  := npy safetensors config ring
FUZZ_SECONDS  ?= 60
FUZZ_RUNS     ?= 100000
FUZZ_SANITIZE := -fsanitize=address,undefined -fno-sanitize-recover=undefined
# An input that needs more than 2 GiB or 10 s is reported as a finding.
FUZZ_FLAGS    := -rss_limit_mb=2048 -timeout=10 -print_final_stats=1
TSAN_BUILD    ?= build-tsan
TSAN_RECORDS  ?= 100000
SOAK_RECORDS  ?= 100000000

.PHONY: fuzz fuzz-ci fuzz-build tsan soak test-large

# The library is built with clang's coverage instrumentation and without
# the MPI transport, whose library is not instrumented.
fuzz-build:
	tools/install-deps.sh clang libclang-rt-dev
	$(MAKE) BUILD=$(FUZZ_BUILD) CC=$(FUZZ_CC) MPI=0 \
	    CFLAGS="-O1 -g -fno-omit-frame-pointer -fsanitize=fuzzer-no-link $(FUZZ_SANITIZE)" \
	    $(FUZZ_TARGETS:%=$(FUZZ_BUILD)/fuzz/fuzz_%)

$(BUILD)/fuzz/fuzz_%: tests/fuzz/fuzz_%.c tests/fuzz/fuzz_input.h $(LIB)
	@mkdir -p $(@D)
	$(CC) $(ALL_CFLAGS) -fsanitize=fuzzer $< $(LIB) $(LDLIBS) -o $@

# Runs fuzz_TARGET with the extra flags in $(1) and the corpus directories
# in $(2), for every target; stops at the first crash.
define run_fuzzers
	@for t in $(FUZZ_TARGETS); do \
	    dict=""; [ -f tests/fuzz/$$t.dict ] && dict="-dict=tests/fuzz/$$t.dict"; \
	    mkdir -p $(FUZZ_BUILD)/crashes && \
	    echo "== fuzz_$$t" && \
	    $(FUZZ_BUILD)/fuzz/fuzz_$$t $(FUZZ_FLAGS) $(1) $$dict \
	        -artifact_prefix=$(FUZZ_BUILD)/crashes/$$t- $(2) || exit 1; \
	done
endef

fuzz: fuzz-build
	@for t in $(FUZZ_TARGETS); do mkdir -p $(FUZZ_BUILD)/corpus/$$t; done
	$(call run_fuzzers,-max_total_time=$(FUZZ_SECONDS),\
	    $(FUZZ_BUILD)/corpus/$$t tests/fuzz/corpus/$$t)

# New inputs go to a scratch directory that starts empty, so that every CI
# run replays the same seeds and mutations.
fuzz-ci: fuzz-build
	@for t in $(FUZZ_TARGETS); do \
	    rm -rf $(FUZZ_BUILD)/ci-corpus/$$t && mkdir -p $(FUZZ_BUILD)/ci-corpus/$$t; \
	done
	$(call run_fuzzers,-runs=$(FUZZ_RUNS) -seed=1,\
	    $(FUZZ_BUILD)/ci-corpus/$$t tests/fuzz/corpus/$$t)

# Criterion crashes at start-up under ThreadSanitizer, so the checks run
# as a plain program.
tsan: deps
	$(MAKE) BUILD=$(TSAN_BUILD) MPI=0 CFLAGS="-O1 -g -fsanitize=thread" \
	    $(TSAN_BUILD)/tsan/ring_threads
	TSAN_OPTIONS="halt_on_error=1 second_deadlock_stack=1" \
	    $(TSAN_BUILD)/tsan/ring_threads $(TSAN_RECORDS)

$(BUILD)/tsan/%: tests/tsan/%.c tests/ring_threads.h $(LIB)
	@mkdir -p $(@D)
	$(CC) $(ALL_CFLAGS) -Itests $< $(LIB) $(LDLIBS) -o $@

soak: deps
	$(MAKE) $(BUILD)/soak/ring_soak
	$(BUILD)/soak/ring_soak $(SOAK_RECORDS)

$(BUILD)/soak/%: tests/soak/%.c $(LIB)
	@mkdir -p $(@D)
	$(CC) $(ALL_CFLAGS) $< $(LIB) $(LDLIBS) -o $@

# One test at a time: together they would need about 20 GiB.
test-large: deps
	$(MAKE) $(BIN) $(BUILD)/large/test_large
	$(BUILD)/large/test_large --jobs 1 --verbose

$(BUILD)/large/%: tests/large/%.c $(wildcard tests/*.h) $(LIB)
	@mkdir -p $(@D)
	$(CC) $(ALL_CFLAGS) -Itests $< $(LIB) $(TEST_LIBS) $(LDLIBS) -o $@
