"""A hostile tenant's plugin in Python, for tests/python_hostile.rs: each path attacks the host in
one way, as the Rust plugins/hostile does on the same path, and must get the answer the Rust one
gets. Nothing here catches what it raises: an exception that leaves `handle` traps the instance,
as a Rust panic does. `/ok` behaves.
"""

import time

import wit_world
from batchbox_sdk import json_response


class Api(wit_world.exports.Api):
    # Nothing for GET /openapi.json beyond the tenant's routes.
    def describe(self) -> str:
        return ""


class Handler(wit_world.exports.Handler):
    def configure(self, config: str) -> None:
        pass

    def handle(self, request):
        attack = request.path.rsplit("/", 1)[-1]
        if attack == "panic":
            raise RuntimeError("this plugin raises on purpose")
        if attack == "loop":
            # Spins in the interpreter without calling the host: only the CPU deadline stops it.
            x = 0
            while True:
                x += 1
        if attack == "sleep":
            # Blocks without using CPU: only the wall-clock limit can stop it.
            time.sleep(3600)
            return json_response(200, "woke up")
        if attack == "memory-bomb":
            hoard = []
            while True:
                hoard.append(bytearray(1 << 20))
        if attack == "recursion":
            # CPython's own recursion limit turns this into a RecursionError, which traps.
            return json_response(200, recurse(10**9))
        return json_response(200, "ok")


def recurse(depth: int) -> int:
    return 0 if depth == 0 else recurse(depth - 1) + 1
