"""tiw-facade: a typed, rate-limited, monitored gRPC door to Tencent Cloud's TIW server API."""

__version__ = "0.1.0"
