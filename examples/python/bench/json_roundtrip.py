"""Builds a 2 MB document, writes it as JSON and reads it back: the json module and dictionaries.

A workload of `invoke bench python-<v>` (recipes/python.yaml), the counterpart of
examples/php/bench/json_roundtrip.php. Prints the text's size and a checksum of what was read.
"""
import json
import zlib


def document():
    return {
        "items": [
            {"id": i, "name": f"item {i}", "price": round(i * 1.25, 2), "tags": ["wasm", "wasi", str(i % 7)],
             "in_stock": i % 3 != 0, "notes": None if i % 5 else "a note with \u00e9 and \u20ac"}
            for i in range(16_500)
        ],
        "meta": {"source": "wasmforge", "version": 1},
    }


def main():
    text = ""
    for _ in range(5):
        text = json.dumps(document())
        back = json.loads(text)
        assert len(back["items"]) == 16_500
    print(len(text), zlib.crc32(json.dumps(back, sort_keys=True).encode()))


if __name__ == "__main__":
    main()
