"""The federated systems the tooling starts and stops: POC, the provisioned secure system, the simulator."""
