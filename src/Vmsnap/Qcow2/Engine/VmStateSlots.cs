namespace Vmsnap.Qcow2;

/// <summary>The VM-state areas open on an image: the one open for writing (at most one), and how many readers each snapshot's has.</summary>
internal sealed class VmStateSlots
{
    /// <summary>The VM-state area open for writing, if any.</summary>
    internal VmStateAllocation? Writer { get; set; }

    /// <summary>Open VM-state readers, by the L1 table offset of the snapshot they read (such a snapshot cannot be deleted).</summary>
    internal Dictionary<long, int> Readers { get; } = [];

    /// <summary>Counts a reader of the snapshot whose L1 table is at <paramref name="l1Offset"/> in (+1) or out (-1).</summary>
    internal void RegisterReader(long l1Offset, int delta)
    {
        int n = Readers.GetValueOrDefault(l1Offset) + delta;
        if (n <= 0) Readers.Remove(l1Offset);
        else Readers[l1Offset] = n;
    }
}
