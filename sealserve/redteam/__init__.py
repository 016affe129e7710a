"""sealserve.redteam: attack your own deployment the way an outsider would.

Only the public SDK is used (``sealserve.client``), so any OIP endpoint can be tested.

- ``oracle``   the attacker's budget: accounts, rotation, refusal handling, ledger
- ``attacks``  equation solving, random, Jacobian augmentation, knockoff, noise
               averaging, rotation
- ``replica``  soft-label replica trainers and the owner's local ground truth
- ``data``     query sources (natural pool, uniform, surrogate distributions)
- ``metrics``  ``run_attack``, ``RunMetrics``, ``honest_utility``, admin status
- ``report``   markdown + PNG report
- ``stress``   the rate-limit stress test (``sealserve stress``)
"""
