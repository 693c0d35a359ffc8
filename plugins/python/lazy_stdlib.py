"""`lazy_stdlib`: calls into the standard library that import a module only when first used.

`datetime.strptime` imports `_strptime`, and decoding bytes in most codecs imports
`encodings.NAME`, inside the standard library and only at the first call. The SDK's build
puts those modules in every plugin; this plugin, which imports neither, checks that they are
there. It has no Rust twin.

Parameters:

- `date` and `format`: parsed with `datetime.strptime`; the result has the ISO date and the
  weekday.
- `hex` and `encoding`: bytes (as hex) decoded with the codec named; the result has the text.
"""

from datetime import datetime

from rebound_sdk import handler


@handler
def lazy_stdlib(task):
    parsed = datetime.strptime(task.param("date"), task.param("format"))
    text = bytes.fromhex(task.param("hex")).decode(task.param("encoding"))
    return {"date": parsed.date().isoformat(), "weekday": parsed.strftime("%A"), "text": text}
