"""The auth service: identities in, gateway-signed 1-day tokens out; the gateway's verification key."""
