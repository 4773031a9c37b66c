"""The site's DP path, one room: what may leave a site that computes on private records.

`site.private_train` / `site.private_evaluate` are the entry points client/app.py calls under
DP. `plan` fixes every release of a run from the released record count (never the exact one),
`gate` is the one place noise is added (each record sanitised first), `training` and `optimizer`
run Opacus' DP-SGD through that gate, `evaluation` is the noisy evaluation reply, and `policy`
says which policy governs the node. Imports: common, client.canaries, client.training.
"""
