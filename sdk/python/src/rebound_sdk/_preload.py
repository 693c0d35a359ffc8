"""Standard-library modules that CPython imports lazily, loaded while the plugin is built.

A component holds only the modules imported while it was built. Some everyday calls import
a module the first time they run, from inside the standard library: ``datetime.strptime``
and ``time.strptime`` import ``_strptime``, and ``bytes.decode("cp1252")`` (or any codec
but the few built in) imports ``encodings.cp1252``. In a plugin those imports would fail at
run time although the handler's own imports are all at the top of its module. The build's
entry module imports this one first, so they are in every plugin. Every codec together adds
about 0.3 MB to a component of about 18.6 MB.
"""

import importlib
import pkgutil

import _strptime  # noqa: F401  (datetime.strptime, time.strptime)
import encodings

for _codec in pkgutil.iter_modules(encodings.__path__):
    try:
        importlib.import_module(f"encodings.{_codec.name}")
    except (ImportError, LookupError):
        # Windows' own codecs (mbcs, oem), and any whose C part this CPython lacks.
        pass
