"""The pure decision core: no grpc, redis, jwt, prometheus, clock or asyncio imports."""
