"""Benchmarks of tiw-facade: ``python -m bench`` (``make bench``) writes ``bench/RESULTS.md``.

The questions, each answered with ratios against a baseline measured in the same run:

- overhead: each RPC through the facade vs the same call made with Tencent's official Python SDK,
  against the same TIW emulator, one call at a time and with 32 in flight, every call a request to
  TIW (each about a task of its own: never the facade's cache); and the latency the facade adds
  (facade - SDK) vs one bare grpc.aio hop measured by the same client;
- quota: under 5x overload, at most 20 arrivals per action in any 1-second window at a strict TIW
  emulator, zero throttles, and nearly all of the quota used (1 replica, and 3 sharing Redis);
- fairness: a caller flooding one action with 10x the quota beside a light one (2 calls/s): the
  light caller's p99 wait within 1 s and none refused, with the quota invariant and utilization kept
  (1 replica, and 3 sharing Redis);
- failover: the Redis primary behind three sentinels killed under 5x overload (three replicas): at
  most 20 arrivals per action in any 1 second and zero throttles throughout, the longest stretch
  without a served call, utilization before, during and after, and a keyed create retried after
  the failover answered with the first task, created once;
- local: answers that need no upstream call (validation failures, immediate RESOURCE_EXHAUSTED)
  vs a bare grpc.aio echo server;
- answers: callers polling at 25x the quota, 10,000 watch streams, the cache hit;
- callbacks: a task's change to every watcher on two replicas, and the Describe requests TIW gets,
  with TIW's callbacks vs polling alone in the same run (and with the periodic refresh slowed).

Every role (emulator, facade, echo server, load generator) runs in its own OS process.
"""
