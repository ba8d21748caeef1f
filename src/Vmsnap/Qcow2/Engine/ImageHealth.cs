namespace Vmsnap.Qcow2;

/// <summary>
/// What the engine has found wrong with the image since it was opened, and so whether it may still
/// change it: the first corruption found (by a validation, a read, a walk or a check), a header
/// switch that failed so that the state on disk is unknown, and a write that would have hit
/// metadata (the image was then marked corrupt and nothing more is written).
/// </summary>
internal sealed class ImageHealth(string path)
{
    /// <summary>The image file's path, for messages.</summary>
    internal string Path { get; } = path;

    /// <summary>The first corruption found; writes are refused while it is set.</summary>
    internal string? Corruption { get; set; }

    /// <summary>Set when a header switch failed in a way that leaves the on-disk state unknown.</summary>
    internal string? SwitchFailure { get; set; }

    /// <summary>Set once a write would have overwritten metadata: the image was marked corrupt, and the engine writes nothing more (QEMU makes such an image unusable).</summary>
    internal string? WritesStopped { get; set; }

    /// <summary>An error about a structure of this image.</summary>
    internal Qcow2FormatException Corrupt(string structure, long? offset, string problem) => new(structure, offset, problem, Path);

    /// <summary>An error about a structure of this image that refuses changes until the image is repaired.</summary>
    internal Qcow2FormatException RepairFirst(string structure, long? offset, string problem) =>
        Qcow2FormatException.NeedingRepair(structure, offset, problem, Path);

    /// <summary>Records a corruption found (writes are refused from now on) and returns its exception.</summary>
    internal Qcow2FormatException Found(string structure, long? offset, string problem) => Record(Corrupt(structure, offset, problem));

    /// <summary>A corruption a write would make worse: recorded; changes are refused until the image is repaired.</summary>
    internal Qcow2FormatException WriteRefused(string structure, long? offset, string problem) =>
        Record(RepairFirst(structure, offset, $"{problem}; a write could damage data, so vmsnap refuses it"));

    /// <summary>A corruption that leaves the image unfit for changes until it is repaired: recorded.</summary>
    internal Qcow2FormatException FoundRepairFirst(string structure, long? offset, string problem) => Record(RepairFirst(structure, offset, problem));

    private Qcow2FormatException Record(Qcow2FormatException e)
    {
        Corruption ??= e.Found;
        return e;
    }

    internal void ThrowIfSwitchFailed()
    {
        if (SwitchFailure is not null)
            throw new OperationRefusedException($"'{Path}': {SwitchFailure}; reopen the image before changing it");
    }
}
