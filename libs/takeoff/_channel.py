"""The SDK's channels are ``takeoff_rpc``'s; this name stays for code that opened them from here."""

from takeoff_rpc.channels import open_channel

__all__ = ["open_channel"]
