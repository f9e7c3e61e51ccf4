"""The web console (docs/design.md §14): a gRPC client of the services that serves pages to a signed-in
browser."""
