namespace Vmsnap.Qcow2;

/// <summary>
/// The refcount repair an image left dirty (lazy refcounts) needs before it is changed, done only
/// when a change goes ahead and only when it leaves the image clean: it is first rehearsed on a
/// scratch overlay of the file (a second engine, the same check), and made for real only when
/// that one finds no corruption and no check error afterwards. Otherwise nothing is written and
/// the change is refused with what the rehearsal found (QEMU repairs on open, and fails the open
/// when its repair fails, having written part of it).
/// </summary>
internal sealed class DirtyRepair(CheckedImage image, ImageHealth health, string path, Qcow2OverlapCheck overlapCheck)
{
    /// <summary>True until the repair was made (or found impossible).</summary>
    internal bool Pending { get; set; }

    /// <summary>Repairs the image if it still needs it; refuses, changing nothing, when the repair would not leave it clean. Under the engine's lock.</summary>
    internal void RunIfPending()
    {
        if (!Pending) return;
        Qcow2CheckResult rehearsal;
        using (var overlay = new ScratchOverlay(image.File.Device))
        using (Qcow2Engine scratch = Qcow2Engine.Open(overlay, path, new Qcow2OpenOptions { OpenBackingFile = false, SkipDirtyRepair = true, OverlapCheck = overlapCheck }, ownsDevice: false))
        {
            rehearsal = scratch.Check(Qcow2RepairMode.All);
        }
        Pending = false;
        if (!IsClean(rehearsal))
            throw health.FoundRepairFirst("header", Qcow2Header.IncompatibleFeaturesOffset,
                $"the image is dirty (refcounts not written back by the program that last wrote it), and repairing it would not leave it clean: "
                + $"{Remains(rehearsal)}; nothing was changed");
        Qcow2CheckResult repaired = Qcow2Checker.Run(image, Qcow2RepairMode.All);
        // The file itself may refuse what the rehearsal could do (growing it that far, say).
        if (!IsClean(repaired))
            throw health.FoundRepairFirst("header", Qcow2Header.IncompatibleFeaturesOffset,
                $"the image was dirty and its repair did not leave it clean: {Remains(repaired)}");
    }

    private static bool IsClean(Qcow2CheckResult r) => r.Failure is null && r.Corruptions == 0 && r.CheckErrors == 0;

    private static string Remains(Qcow2CheckResult r)
    {
        string first = r.Failure ?? r.FirstError();
        return $"{r.Corruptions} corruption(s) and {r.CheckErrors} check error(s) remain (first: {first})";
    }
}
