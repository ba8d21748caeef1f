namespace Vmsnap.Qcow2;

/// <summary>Check and repair of the open image (the checker lives in Check/; the repair a dirty image gets before its first change in DirtyRepair).</summary>
internal sealed partial class Qcow2Engine
{
    /// <summary>Checks (and optionally repairs) the image; waits for requests in flight. What it finds decides whether writes are refused.</summary>
    internal Qcow2CheckResult Check(Qcow2RepairMode mode)
    {
        if (mode != Qcow2RepairMode.None && ReadOnly)
            throw new OperationRefusedException($"'{Path}' is open read-only; open it writable to repair it");
        return Gate.RunExclusive(() =>
        {
            // A repair may rebuild refcounts in free clusters, and the area's reservation is free on disk.
            if (mode != Qcow2RepairMode.None && State.VmState.Writer is not null)
                throw new OperationRefusedException($"'{Path}': close the VM-state area open for writing before repairing the image");
            Qcow2CheckResult result = Qcow2Checker.Run(CheckedParts, mode);
            // A repair may have rewritten tables and flags: validate again as they are used.
            Mapping.ForgetValidation();
            if (mode != Qcow2RepairMode.None) DirtyRepair.Pending = false;   // repaired, or what is left refuses writes below
            if (result.Corruptions > 0 || result.CheckErrors > 0)
            {
                string first = result.FirstError();
                State.Health.Corruption = $"'{Path}': check finds {result.Corruptions} corruption(s) and {result.CheckErrors} error(s) (first: {first})";
            }
            else
            {
                State.Health.Corruption = null;
            }
            return result;
        });
    }
}
