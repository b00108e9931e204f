"""Crossed-look + futility -> NO-GO: false NO-GO of a truly non-inferior sparse arm, by simulation with the
gate's own streams/bets (rollout.gate.quality/sequences), honest vs sorted import orders."""
import math, sys
import numpy as np
from scipy.stats import beta as B
from rollout.gate.sequences import paired_stream, ipw_stream, two_sided_bets, log_capital
from rollout.gate.quality import prior
from rollout.gate.settings import GateSettings

rng = np.random.default_rng(int(sys.argv[1]) if len(sys.argv) > 1 else 1)
S = GateSettings(go_alpha=0.0304)
M0 = -S.margin; TG = math.log(1 / S.alpha_go); TF = math.log(1 / S.alpha)

def run(z_stream, mode, share, per_look, min_n, n_t_cum):
    kw = prior(S, mode, share)
    lam = two_sided_bets(z_stream, M0, **kw)
    go = np.maximum.accumulate(log_capital(z_stream, lam["lower"], M0, "lower"), axis=-1) >= TG
    fu = np.maximum.accumulate(log_capital(z_stream, lam["upper"], M0, "upper"), axis=-1) >= TF
    R, N = z_stream.z.shape
    new = np.full(R, "", dtype=object); old = np.full(R, "", dtype=object)
    looks = N // per_look
    for k in range(1, looks + 1):
        t = k * per_look - 1
        g, f = go[:, t], fu[:, t]
        enough = n_t_cum[:, t] >= min_n
        at_max = k == looks
        for rule, out in (("new", new), ("old", old)):
            open_ = out == ""
            crossed = g & f
            if rule == "new":
                nog_x = open_ & crossed & f & enough
                out[nog_x] = "NOGO-crossed"
            open_ = out == ""
            out[open_ & crossed & at_max] = "NOGO-maxinvalid"
            open_ = (out == "") & ~crossed
            out[open_ & f & enough] = "NOGO-futility"
            open_ = (out == "") & ~crossed
            out[open_ & g & enough] = "GO"
            out[(out == "") & at_max] = "NOGO-max"
    return new, old

def ci(x, n):
    p = x / n; h = 1.96 * math.sqrt(max(p * (1 - p), 1e-12) / n) + (1.0 / n)
    return f"{100*p:.2f}% (upper {100*(p+h):.2f}%)"

def report(name, new, old):
    R = len(new)
    def s(out):
        vals = {v: int((out == v).sum()) for v in ("GO", "NOGO-futility", "NOGO-crossed", "NOGO-maxinvalid", "NOGO-max")}
        early = vals["NOGO-futility"] + vals["NOGO-crossed"]
        return vals, early
    vn, en = s(new); vo, eo = s(old)
    print(f"{name:58s} new: early NO-GO {ci(en,R)} [crossed {vn['NOGO-crossed']}] GO {vn['GO']} | old: early NO-GO {ci(eo,R)} [crossed->INVALID->max {vo['NOGO-maxinvalid']}] GO {vo['GO']}")

R = int(sys.argv[2]) if len(sys.argv) > 2 else 8000
for per_look in (8, 25, 50):
    looks = 20; N = per_look * looks
    # --- paired, boundary: rare losses, d in {0,-1}, P(loss)=margin  (true diff = -margin: non-inferior, at the edge)
    for label, gen in (
        ("paired rare losses p=0.03", lambda: -(rng.random((R, N)) < 0.03).astype(float)),
        ("paired 0/1 indep c=.8,t=.77", lambda: (rng.random((R, N)) < 0.77).astype(float) - (rng.random((R, N)) < 0.80)),
        ("paired beta skewed d=-0.03", lambda: np.clip(B.rvs(8, 2, size=(R, N), random_state=rng) - 0.03, 0, 1) - B.rvs(8, 2, size=(R, N), random_state=rng)),
    ):
        d = gen()
        ncum = np.broadcast_to(np.arange(1, N + 1), (R, N))
        new, old = run(paired_stream(d), "paired", 0.5, per_look, 100, ncum)
        report(f"[{per_look}/look] honest {label}", new, old)
        # sorted within each look's import file by difference ascending (losses first)
        ds = np.sort(d.reshape(R, looks, per_look), axis=-1).reshape(R, N)
        new, old = run(paired_stream(ds), "paired", 0.5, per_look, 100, ncum)
        report(f"[{per_look}/look] sorted-per-file {label}", new, old)
        dd = -np.sort(-d.reshape(R, looks, per_look), axis=-1).reshape(R, N)
        new, old = run(paired_stream(dd), "paired", 0.5, per_look, 100, ncum)
        report(f"[{per_look}/look] sorted-DESC-per-file {label}", new, old)
        dd = -np.sort(-d.reshape(R, 2, N//2), axis=-1).reshape(R, N)
        new, old = run(paired_stream(dd), "paired", 0.5, per_look, 100, ncum)
        report(f"[{per_look}/look] sorted-DESC-two-halves {label}", new, old)
        # one file for the whole step sorted by loss (e.g. exported ORDER BY quality)
        new, old = run(paired_stream(np.sort(d, axis=-1)), "paired", 0.5, per_look, 100, ncum)
        report(f"[{per_look}/look] sorted-whole {label}", new, old)
    # --- split, share 0.5 and 0.1, 0/1 scores at boundary
    for share in (0.5, 0.1):
        T = rng.random((R, N)) < share
        q = np.where(T, rng.random((R, N)) < 0.77, rng.random((R, N)) < 0.80).astype(float)
        ncum = np.minimum(np.cumsum(T, -1), np.cumsum(~T, -1))
        new, old = run(ipw_stream(q, T, share), "split", share, per_look, 30, ncum)
        report(f"[{per_look}/look] honest split {share} 0/1 .80/.77 min30", new, old)
        # arm by arm within each look's file (control rows, then treatment rows)
        idx = np.argsort(T.reshape(R, looks, per_look), axis=-1, kind="stable")
        Ts = np.take_along_axis(T.reshape(R, looks, per_look), idx, -1).reshape(R, N)
        qs = np.take_along_axis(q.reshape(R, looks, per_look), idx, -1).reshape(R, N)
        ncum2 = np.minimum(np.cumsum(Ts, -1), np.cumsum(~Ts, -1))
        new, old = run(ipw_stream(qs, Ts, share), "split", share, per_look, 30, ncum2)
        report(f"[{per_look}/look] arm-by-arm-per-file split {share} min30", new, old)
        idx2 = np.argsort(~T.reshape(R, looks, per_look), axis=-1, kind="stable")
        Tt = np.take_along_axis(T.reshape(R, looks, per_look), idx2, -1).reshape(R, N)
        qt = np.take_along_axis(q.reshape(R, looks, per_look), idx2, -1).reshape(R, N)
        n3 = np.minimum(np.cumsum(Tt, -1), np.cumsum(~Tt, -1))
        new, old = run(ipw_stream(qt, Tt, share), "split", share, per_look, 30, n3)
        report(f"[{per_look}/look] treat-first-per-file split {share} min30", new, old)
        # equal arms (truly as good) arm by arm
        q2 = (rng.random((R, N)) < 0.80).astype(float)
        qs2 = np.take_along_axis(q2.reshape(R, looks, per_look), idx, -1).reshape(R, N)
        new, old = run(ipw_stream(qs2, Ts, share), "split", share, per_look, 30, ncum2)
        report(f"[{per_look}/look] arm-by-arm-per-file split {share} EQUAL arms", new, old)
