"""The SDK in plain CPython: tasks, failures, handler discovery, the export glue and the
build command's checks. The glue runs against the real bindings componentize-py generates
for wit/ (its stubs, which raise for host calls; the host module is told there is no host).

The plugins themselves are tested on the real host, in the Rust test suite
(tests/tests/python.rs and the lifecycle cases).
"""

from __future__ import annotations

import importlib
import subprocess
import sys
import tempfile
import types
import unittest
from datetime import timedelta
from pathlib import Path

import rebound_sdk
from rebound_sdk import Fatal, Handler, Retry, RetryAfter, Task, handler
from rebound_sdk.build import WIT_DIR, BuildError, build
from rebound_sdk.handler import find_handler


def task(params_json: str = "{}", attempt: int = 1, max_attempts: int = 3) -> Task:
    return Task("t-1", "q", params_json, attempt, max_attempts)


def module(name: str, source: str) -> types.ModuleType:
    mod = types.ModuleType(name)
    exec(compile(source, f"{name}.py", "exec"), mod.__dict__)
    return mod


class TaskTest(unittest.TestCase):
    def test_params_decode_and_fields_name_what_is_missing(self):
        t = task('{"width": 640, "tags": ["a"]}')
        self.assertEqual(t.params, {"width": 640, "tags": ["a"]})
        self.assertEqual(t.param("width"), 640)
        self.assertIsNone(t.param("height", None))
        with self.assertRaisesRegex(Fatal, "params has no field `height`"):
            t.param("height")

    def test_a_task_for_unit_tests(self):
        t = Task.of({"url": "u"}, attempt=2)
        self.assertEqual((t.param("url"), t.attempt, t.max_attempts), ("u", 2, 4))
        self.assertFalse(t.is_last_attempt, "attempt 2 of the default policy's 4")
        self.assertEqual(Task.of(attempt=6).max_attempts, 6)
        self.assertTrue(Task.of(attempt=4).is_last_attempt)
        self.assertEqual(Task.of().params, {})

    def test_params_that_are_not_an_object_or_not_json_are_fatal(self):
        with self.assertRaisesRegex(Fatal, "JSON array, not an object"):
            task("[1, 2]").param("x")
        with self.assertRaisesRegex(Fatal, "task t-1 has unusable params"):
            task("{nope").params

    def test_last_attempt(self):
        self.assertFalse(task(attempt=2, max_attempts=3).is_last_attempt)
        self.assertTrue(task(attempt=3, max_attempts=3).is_last_attempt)


class FailureTest(unittest.TestCase):
    def test_retry_after_takes_seconds_or_a_timedelta(self):
        self.assertEqual(RetryAfter(0.4, "busy").delay_ms, 400)
        self.assertEqual(RetryAfter(timedelta(minutes=1), "busy").delay_ms, 60_000)
        self.assertEqual(RetryAfter(0, "now").delay_ms, 0)
        with self.assertRaisesRegex(ValueError, "zero or more seconds"):
            RetryAfter(-1, "never")

    def test_failures_carry_their_message_or_their_name(self):
        self.assertEqual(Retry("try later").message, "try later")
        self.assertEqual(str(Fatal("bad input")), "bad input")
        self.assertEqual(Fatal().message, "Fatal")
        self.assertEqual(RetryAfter(2).message, "RetryAfter")


class DiscoveryTest(unittest.TestCase):
    def test_a_decorated_function_is_found_and_stays_callable(self):
        mod = module(
            "app",
            "from rebound_sdk import handler\n"
            "@handler\n"
            "def echo(task):\n"
            "    return task.params\n",
        )
        found = find_handler(mod)
        self.assertEqual(found.handle(task('{"a": 1}')), {"a": 1})
        self.assertEqual(mod.echo(task("[]")), [])

    def test_a_handler_class_is_found_and_imported_ones_are_not(self):
        mod = module(
            "app",
            "from rebound_sdk import Handler\n"
            "class Mine(Handler):\n"
            "    def handle(self, task):\n"
            "        return 'mine'\n",
        )
        self.assertEqual(find_handler(mod).handle(task()), "mine")

    def test_none_or_several_handlers_are_errors_that_say_so(self):
        with self.assertRaisesRegex(LookupError, "declares no handler"):
            find_handler(module("empty", "from rebound_sdk import Handler, handler\n"))
        two = module(
            "two",
            "from rebound_sdk import Handler, handler\n"
            "class A(Handler):\n    pass\n"
            "@handler\ndef b(task):\n    return 1\n",
        )
        with self.assertRaisesRegex(LookupError, r"declares 2 handlers \(A, b\)"):
            find_handler(two)

    def test_a_shared_base_class_is_not_a_second_handler(self):
        mod = module(
            "based",
            "from rebound_sdk import Handler\n"
            "class Base(Handler):\n"
            "    def helper(self):\n"
            "        return 'base'\n"
            "class Real(Base):\n"
            "    def handle(self, task):\n"
            "        return self.helper() + ' real'\n",
        )
        self.assertEqual(find_handler(mod).handle(task()), "base real")

    def test_an_imported_handler_serves_when_the_module_defines_none(self):
        lib = module("lib", "from rebound_sdk import handler\n@handler\ndef resize(task):\n    return 'lib'\n")
        app = module("app", "")
        app.resize = lib.resize
        self.assertEqual(find_handler(app).handle(task()), "lib")
        app.other = module("lib2", "from rebound_sdk import handler\n@handler\ndef other(task):\n    pass\n").other
        with self.assertRaisesRegex(LookupError, r"imports 2 handlers \(resize, other\)"):
            find_handler(app)

    def test_async_handlers_are_refused(self):
        with self.assertRaisesRegex(TypeError, "is `async def`"):
            module("asyncy", "from rebound_sdk import handler\n@handler\nasync def h(task):\n    pass\n")
        mod = module(
            "asyncy",
            "from rebound_sdk import Handler\n"
            "class H(Handler):\n"
            "    async def handle(self, task):\n"
            "        pass\n",
        )
        with self.assertRaisesRegex(TypeError, r"H.handle is `async def`"):
            find_handler(mod)

    def test_a_configured_instance_serves_instead_of_its_class(self):
        mod = module(
            "configured",
            "from rebound_sdk import Handler\n"
            "class Resize(Handler):\n"
            "    def __init__(self, width):\n"
            "        self.width = width\n"
            "    def handle(self, task):\n"
            "        return self.width\n"
            "resize = Resize(width=640)\n",
        )
        self.assertEqual(find_handler(mod).handle(task()), 640)
        mod.thumbnail = mod.Resize(width=64)
        with self.assertRaisesRegex(LookupError, r"declares 2 handlers \(resize, thumbnail\)"):
            find_handler(mod)

    def test_a_class_that_needs_arguments_is_refused(self):
        mod = module(
            "needy",
            "from rebound_sdk import Handler\n"
            "class Needy(Handler):\n"
            "    def __init__(self, model):\n"
            "        self.model = model\n",
        )
        fix = r"constructible without arguments .*`handler = Needy\(\.\.\.\)`"
        with self.assertRaisesRegex(TypeError, fix):
            find_handler(mod)

    def test_handler_refuses_what_is_not_callable(self):
        with self.assertRaisesRegex(TypeError, "takes a function"):
            handler(42)


class HostOutsideAPluginTest(unittest.TestCase):
    def test_progress_only_rises_and_cancelled_is_false(self):
        rebound_sdk.host.local_progress = 0
        rebound_sdk.set_progress(40.9)
        rebound_sdk.set_progress(20)
        rebound_sdk.set_progress(101)
        rebound_sdk.set_progress(float("nan"))
        self.assertEqual(rebound_sdk.host.local_progress, 40)
        self.assertFalse(rebound_sdk.cancelled())

    def test_progress_that_is_not_a_number_is_a_type_error(self):
        for value in (None, "50", True):
            with self.subTest(value=value), self.assertRaisesRegex(TypeError, "takes a number"):
                rebound_sdk.set_progress(value)


class RecordingHost:
    """Stands in for the component's `host` import, recording what the SDK sends it."""

    def __init__(self):
        self.progress = []

    def set_progress(self, percent):
        self.progress.append(percent)


class ProgressInsideAPluginTest(unittest.TestCase):
    def setUp(self):
        self.sent = RecordingHost()
        rebound_sdk.host._host = self.sent
        self.addCleanup(setattr, rebound_sdk.host, "_host", None)

    def test_only_a_rise_over_the_tasks_progress_reaches_the_host(self):
        # The host counts every call against limits.max_progress_per_s: a loop reporting on
        # every pass must not send the same percent again and again.
        rebound_sdk.host._start_attempt(30)
        for percent in [10, 30, 31, 31, 31, 50, 40, 100, 100, 101]:
            rebound_sdk.set_progress(percent)
        self.assertEqual(self.sent.progress, [31, 50, 100])

    def test_a_loop_of_ten_thousand_passes_sends_at_most_a_hundred_updates(self):
        rebound_sdk.host._start_attempt(0)
        for i in range(10_000):
            rebound_sdk.set_progress(i * 100 // 10_000)
        self.assertEqual(self.sent.progress, list(range(1, 100)))


class ExportGlueTest(unittest.TestCase):
    """The glue against componentize-py's generated bindings for wit/plugin.wit."""

    @classmethod
    def setUpClass(cls):
        cls.bindings = tempfile.TemporaryDirectory()
        subprocess.run(
            [
                sys.executable,
                "-c",
                "import sys, componentize_py; sys.argv[0] = 'componentize-py'; "
                "sys.exit(componentize_py.script())",
                "--wit-path",
                str(WIT_DIR),
                "--world",
                "rebound:plugin/handler",
                "bindings",
                cls.bindings.name,
            ],
            check=True,
        )
        sys.path.insert(0, cls.bindings.name)
        cls.export = importlib.import_module("rebound_sdk._export")
        cls.wit = importlib.import_module("wit_world.imports.types")
        cls.Err = importlib.import_module("componentize_py_types").Err
        # The stubs raise for every host call: run as though outside a plugin.
        rebound_sdk.host._host = None

    @classmethod
    def tearDownClass(cls):
        sys.path.remove(cls.bindings.name)
        cls.bindings.cleanup()

    def world(self, source: str):
        return self.export.world_for(module("app", "from rebound_sdk import *\n" + source))()

    def wit_task(self, params: str = "{}"):
        return self.wit.Task("t-9", "q", params, 2, 4, None, 30)

    def outcome(self, world):
        try:
            return world.handle(self.wit_task('{"n": 5}'))
        except self.Err as err:
            return err.value

    def test_results_are_json_and_the_task_arrives_whole(self):
        world = self.world(
            "@handler\n"
            "def h(task):\n"
            "    return [task.id, task.queue, task.params, task.attempt, task.max_attempts,"
            " task.gpu, task.progress]\n"
        )
        self.assertEqual(
            self.outcome(world), '["t-9","q",{"n":5},2,4,null,30]'
        )

    def test_each_failure_maps_onto_its_wit_case(self):
        cases = {
            "raise Retry('later')": self.wit.Failure_Retry("later"),
            "raise RetryAfter(1.5, 'busy')": self.wit.Failure_RetryAfter(
                self.wit.RetryAfter(1500, "busy")
            ),
            "raise Fatal('bad')": self.wit.Failure_Fatal("bad"),
            "raise KeyError('gone')": self.wit.Failure_Retry("KeyError: 'gone'"),
            "raise RuntimeError()": self.wit.Failure_Retry("RuntimeError"),
            "raise SystemExit(3)": self.wit.Failure_Retry("SystemExit: 3"),
            "raise Fatal": self.wit.Failure_Fatal("Fatal"),
            "import no_such_module_here": self.wit.Failure_Fatal(
                "ModuleNotFoundError: No module named 'no_such_module_here' (a plugin holds "
                "only the modules imported while it was built, and a library may import one "
                "only when it is first used: add `import no_such_module_here` at the top of "
                "the handler's module)"
            ),
            # (Newer Pythons add ": nan" to the message.)
            "return float('nan')": self.wit.Failure_Fatal(
                "the handler's result is not JSON: Out of range float values are not JSON "
                "compliant"
            ),
            "task.param('missing')": self.wit.Failure_Fatal("params has no field `missing`"),
            "return object()": self.wit.Failure_Fatal(
                "the handler's result is not JSON: Object of type object is not JSON serializable"
            ),
        }
        for body, expected in cases.items():
            with self.subTest(body):
                world = self.world(f"@handler\ndef h(task):\n    {body}\n")
                got = self.outcome(world)
                if "nan" in body:
                    got = type(got)(got.value.removesuffix(": nan"))
                self.assertEqual(got, expected)

    def test_each_attempt_reports_progress_from_the_tasks_own(self):
        sent = RecordingHost()
        rebound_sdk.host._host = sent
        self.addCleanup(setattr, rebound_sdk.host, "_host", None)
        world = self.world(
            "@handler\n"
            "def h(task):\n"
            "    for percent in (10, 30, 35, 35):\n"
            "        set_progress(percent)\n"
        )
        world.handle(self.wit_task())  # the task's progress is 30
        self.assertEqual(sent.progress, [35])

    def test_the_exhausted_hook_runs_and_its_exceptions_stay_inside(self):
        app = module(
            "app",
            "from rebound_sdk import Handler\n"
            "seen = []\n"
            "class H(Handler):\n"
            "    def on_exhausted(self, task, error):\n"
            "        seen.append((task.id, error))\n"
            "        raise ValueError('alerting is down')\n",
        )
        world = self.export.world_for(app)()
        self.assertIsNone(world.on_exhausted(self.wit_task(), "last error"))
        self.assertEqual(app.seen, [("t-9", "last error")])


class BuildChecksTest(unittest.TestCase):
    """What the build command refuses before it runs componentize-py."""

    def test_bad_paths_and_names_are_refused_with_the_reason(self):
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            (tmp / "my-app.py").write_text("")
            (tmp / "wit_world.py").write_text("")
            (tmp / "email.py").write_text("")
            (tmp / "annotationlib.py").write_text("")
            (tmp / "syntax.py").write_text("def f(:\n")
            (tmp / "ok.py").write_text("")
            (tmp / "notes.txt").write_text("")
            cases = [
                (tmp / "missing.py", None, "does not exist"),
                (tmp / "notes.txt", None, "is not a Python file"),
                (tmp / "my-app.py", None, "cannot be imported as a Python module"),
                (tmp / "wit_world.py", None, "is reserved"),
                (tmp / "email.py", None, "standard library"),
                # In the CPython a component embeds (3.14), perhaps not in the one building.
                (tmp / "annotationlib.py", None, "standard library"),
                (tmp / "syntax.py", None, r"syntax.py, line 1: "),
                (tmp / "ok.py", tmp / "ok.so", "ends in .wasm"),
            ]
            for app, output, message in cases:
                with self.subTest(app=app.name), self.assertRaisesRegex(BuildError, message):
                    build(app, output, quiet=True)

    def test_an_output_folder_that_cannot_be_made_is_an_error_that_names_it(self):
        with tempfile.TemporaryDirectory() as tmp:
            app = Path(tmp) / "ok.py"
            app.write_text("")
            (Path(tmp) / "blocker").write_text("a file where the folder would go")
            with self.assertRaisesRegex(BuildError, r"cannot create the folder for .*blocker"):
                build(app, Path(tmp) / "blocker" / "ok.wasm", quiet=True)

    def test_an_app_named_after_the_standard_library_is_refused_from_its_own_folder(self):
        # `python -m` puts the current folder first on the module path, where `json.py`
        # would hide the `json` the build command itself imports.
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / "json.py").write_text("raise SystemExit('the app ran in the build command')\n")
            done = subprocess.run(
                [sys.executable, "-m", "rebound_sdk", "build", "json.py"],
                cwd=tmp,
                capture_output=True,
                text=True,
            )
            self.assertEqual(done.returncode, 1, done.stderr)
            self.assertIn("`json` is a module of Python's standard library", done.stderr)

    def test_a_package_whose_compiled_part_is_missing_is_named(self):
        from rebound_sdk.build import _missing_module_hint

        with tempfile.TemporaryDirectory() as tmp:
            lib = Path(tmp) / "lib"
            (lib / "fastcore").mkdir(parents=True)
            (lib / "fastcore" / "__init__.py").write_text("from ._impl import Thing\n")
            (lib / "fastcore" / "_impl.cpython-311-x86_64-linux-gnu.so").write_bytes(b"\x7fELF")
            detail = (
                "ImportError: cannot import name 'Thing' from 'fastcore._impl' (unknown location)"
            )
            hint = _missing_module_hint(detail, [lib])
            self.assertIsNotNone(hint)
            self.assertIn("fastcore/_impl.cpython-311-x86_64-linux-gnu.so", hint)
            self.assertIsNone(_missing_module_hint("ValueError: nothing to do with imports", [lib]))

    def test_an_extension_module_is_named_as_the_reason_it_is_missing(self):
        with tempfile.TemporaryDirectory() as tmp:
            lib = Path(tmp) / "lib"
            lib.mkdir()
            # What pip leaves for a package with C code: a shared object for this machine.
            (lib / "fastparse.cpython-311-x86_64-linux-gnu.so").write_bytes(b"\x7fELF")
            app = Path(tmp) / "uses_c.py"
            app.write_text("import fastparse\n")
            with self.assertRaisesRegex(BuildError, "cannot load in WebAssembly"):
                build(app, Path(tmp) / "uses_c.wasm", [lib], quiet=True)

    def test_an_app_that_fails_at_import_fails_the_build_with_its_error(self):
        with tempfile.TemporaryDirectory() as tmp:
            app = Path(tmp) / "broken.py"
            app.write_text("raise RuntimeError('config file missing')\n")
            with self.assertRaisesRegex(BuildError, "config file missing"):
                build(app, Path(tmp) / "broken.wasm", quiet=True)
            self.assertFalse((Path(tmp) / "broken.wasm").exists())


if __name__ == "__main__":
    unittest.main()
