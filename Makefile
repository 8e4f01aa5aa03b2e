# moe-ep build.
#
#   make            build the library, the program and the tests into build/
#   make run        install missing packages, build, and run the default layer
#   make test       install missing packages, build, and run the test suite
#   make sanitize   build into build-san/ with ASan+UBSan and run the suite
#   make bench      run the benchmark and rewrite docs/BENCHMARKS.md
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

.PHONY: all deps run test check sanitize bench golden clean
all: $(BIN) $(TEST_BIN)

$(BUILD)/obj/%.o: src/%.c $(wildcard include/*.h) | $(BUILD)/obj
	$(CC) $(ALL_CFLAGS) -c $< -o $@

$(LIB): $(LIB_OBJ)
	$(AR) rcs $@ $^

$(BIN): src/main.c $(LIB)
	$(CC) $(ALL_CFLAGS) $< $(LIB) $(LDLIBS) -o $@

$(BUILD)/tests/%: tests/%.c $(wildcard tests/*.h) $(LIB) | $(BUILD)/tests
	$(CC) $(ALL_CFLAGS) $< $(LIB) $(TEST_LIBS) $(LDLIBS) -o $@

$(BUILD)/obj $(BUILD)/tests:
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
check: $(BIN) $(TEST_BIN)
	tools/run-tests.sh $(BUILD)

test: deps
	$(MAKE) check

sanitize: deps
	ASAN_OPTIONS=detect_leaks=1 LSAN_OPTIONS=suppressions=$(CURDIR)/tools/lsan.supp \
	UBSAN_OPTIONS=print_stacktrace=1 \
	$(MAKE) BUILD=build-san \
	    CFLAGS="-O1 -g -fno-omit-frame-pointer -fsanitize=address,undefined -fno-sanitize-recover=undefined" \
	    check

bench: deps
	$(MAKE) $(BIN)
	$(BIN) bench --markdown docs/BENCHMARKS.md

clean:
	rm -rf build build-san
