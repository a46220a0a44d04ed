"""Benchmarks of tiw-facade: ``python -m bench`` (``make bench``) writes ``bench/RESULTS.md``.

Three questions, each answered with ratios against a baseline measured in the same run:

- overhead: each RPC through the facade vs the same call made with Tencent's official Python SDK,
  against the same TIW emulator, one call at a time and with 32 in flight;
- quota: under 5x overload, at most 20 arrivals per action in any 1-second window at a strict TIW
  emulator, zero throttles, and nearly all of the quota used (1 replica, and 3 sharing Redis);
- local: answers that need no upstream call (validation failures, immediate RESOURCE_EXHAUSTED)
  vs a bare grpc.aio echo server.

Every role (emulator, facade, echo server, load generator) runs in its own OS process.
"""
