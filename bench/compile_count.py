"""How many Triton compiles the kernel tests cost on a GPU, counted on a CPU.

    python bench/compile_count.py              # the count per kernel and the tests that add the most
    python bench/compile_count.py --json       # {"compiles": n, "by_kernel": {...}, "by_test": {...}}

bench/gpu_check.sh's first section runs tests/test_flash_attention.py and tests/test_logprob.py with the
kernels compiled (TRITON_INTERPRET=0). Triton compiles a kernel once for each distinct key: its argument
types, its constexprs (block sizes, HEAD_DIM, CAUSAL, ...), num_warps / num_stages, and its own
specialisation of each argument (an integer divisible by 16 or equal to 1, a pointer 16-byte aligned).
A compile takes about a second, so the count is most of that section's time on a GPU.

How. The same tests run here under the interpreter, with every kernel launch intercepted: each launch's
key is made the way JITFunction.run would make it on a GPU (bench/compile_report.py's _compile_inputs),
with the block sizes and warps the GPU would choose (each module's _launch_config(..., interpreting=False))
in place of the interpreter's, and the interpreter-only bf16 upcast switched off. Then the launch runs
as usual, so the tests pass or fail as they do in the suite.
"""

import argparse
import collections
import json
import os
import sys
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: the tests run under the interpreter
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
TEST_FILES = ["tests/test_flash_attention.py", "tests/test_logprob.py"]  # what gpu_check's tests section runs


class _Counter:
    """Patches kernels/ so that every launch records its GPU compile key, under the test that made it."""

    def __init__(self):
        self.keys = {}  # key -> the first test that needed it
        self.launches = collections.Counter()  # test -> launches
        self.test = "(collection)"
        self._gpu_config = {}

    # pytest hooks: which test is running
    def pytest_runtest_setup(self, item):
        self.test = item.nodeid

    def patch(self):
        import triton

        from kernels import flash_attention as fa
        from kernels import logprob as lp
        from bench.compile_report import _compile_inputs

        for module in (fa, lp):
            real_config = module._launch_config

            def config(*args, interpreting=None, _real=real_config, _module=module.__name__):
                # what the GPU would choose, kept for the launch that follows
                self._gpu_config[_module] = _real(*args, interpreting=False)
                return _real(*args, interpreting=interpreting)

            module._launch_config = config
            for name, kernel in list(vars(module).items()):
                if name.endswith("_kernel") and hasattr(kernel, "fn"):
                    jit = triton.runtime.jit.JITFunction(kernel.fn, **kernel.kwargs)  # do_not_specialize
                    setattr(module, name, _Launch(self, kernel, jit, module.__name__, _compile_inputs))

    def record(self, name, module, jit, args, kwargs, compile_inputs):
        gpu = self._gpu_config.get(module, {})
        kwargs = {k: gpu.get(k, v) for k, v in kwargs.items()}  # the GPU's block sizes
        kwargs.update({k: v for k, v in gpu.items() if k in ("num_warps", "num_stages")})
        if "UPCAST_BF16_DOT" in kwargs:
            kwargs["UPCAST_BF16_DOT"] = False  # the interpreter's workaround; a GPU never sets it
        signature, constexprs, attrs, options = compile_inputs(jit, args, kwargs)
        key = (name, tuple(signature.items()), tuple(sorted(constexprs.items(), key=str)),
               tuple(sorted((k, str(v)) for k, v in attrs.items())), tuple(sorted(options.items())))
        self.keys.setdefault(key, self.test)
        self.launches[self.test] += 1


class _Launch:
    def __init__(self, counter, kernel, jit, module, compile_inputs):
        self.counter, self.kernel, self.jit, self.module = counter, kernel, jit, module
        self.compile_inputs = compile_inputs

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.counter.record(self.jit.__name__, self.module, self.jit, args, kwargs, self.compile_inputs)
            return self.kernel[grid](*args, **kwargs)
        return launch


def count(select=None):
    """Run the kernel tests once; returns (pytest exit code, _Counter)."""
    import warnings

    import pytest

    warnings.filterwarnings("ignore", category=RuntimeWarning, module="triton.runtime.interpreter")
    counter = _Counter()
    counter.patch()
    args = ["-q", "-p", "no:cacheprovider", "-W", "ignore::RuntimeWarning", *[str(REPO / f) for f in TEST_FILES]]
    if select:
        args += ["-k", select]
    code = pytest.main(args, plugins=[counter])
    return int(code), counter


def summary(counter):
    by_kernel = collections.Counter(key[0] for key in counter.keys)
    by_test = collections.Counter(counter.keys.values())
    return dict(compiles=len(counter.keys), by_kernel=dict(by_kernel.most_common()),
                by_test=dict(by_test.most_common()))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true", help="print the counts as one JSON object")
    parser.add_argument("-k", dest="select", default=None, help="only the tests pytest -k selects")
    args = parser.parse_args(argv)
    code, counter = count(args.select)
    result = summary(counter)
    if args.json:
        print(json.dumps(result))
    else:
        print(f"\n{result['compiles']} distinct compiles on a GPU (pytest exit code {code})\n")
        print("| kernel | compiles |\n| --- | --- |")
        for name, n in result["by_kernel"].items():
            print(f"| {name} | {n} |")
        print("\n| test (the first to need a compile) | new compiles |\n| --- | --- |")
        for test, n in result["by_test"].items():
            print(f"| {test} | {n} |")
    return code


if __name__ == "__main__":
    sys.exit(main())
