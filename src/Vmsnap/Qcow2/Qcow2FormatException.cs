namespace Vmsnap.Qcow2;

/// <summary>
/// The image is not a qcow2 image vmsnap can use as asked: a structure is malformed, points outside
/// the file, uses a feature vmsnap does not support, or a write would damage data. The message names
/// the image, the structure and, when there is one, its file offset; <see cref="RepairNeeded"/> says whether
/// vmsnap refuses to change the image until it is repaired.
/// </summary>
public sealed class Qcow2FormatException : VmsnapException
{
    /// <summary>Creates the error.</summary>
    /// <param name="structure">The structure at fault, e.g. "header", "L1 table", "L2 table entry 5".</param>
    /// <param name="fileOffset">Offset in the image file of that structure, or null when none applies.</param>
    /// <param name="problem">What is wrong, in words.</param>
    /// <param name="image">The image file's path, when known.</param>
    public Qcow2FormatException(string structure, long? fileOffset, string problem, string? image = null)
        : this(structure, fileOffset, problem, image, repairNeeded: false)
    {
    }

    private Qcow2FormatException(string structure, long? fileOffset, string problem, string? image, bool repairNeeded)
        : base(Compose(structure, fileOffset, problem, image) + (repairNeeded ? "; repair it first" : ""))
    {
        Structure = structure;
        FileOffset = fileOffset;
        Problem = problem;
        Image = image;
        RepairNeeded = repairNeeded;
    }

    /// <summary>The same error, saying that the image must be repaired before vmsnap changes it.</summary>
    internal static Qcow2FormatException NeedingRepair(string structure, long? fileOffset, string problem, string? image) =>
        new(structure, fileOffset, problem, image, repairNeeded: true);

    /// <summary>The structure at fault.</summary>
    public string Structure { get; }

    /// <summary>Offset of the structure in the image file, when known.</summary>
    public long? FileOffset { get; }

    /// <summary>What is wrong, without the location.</summary>
    public string Problem { get; }

    /// <summary>The image file's path, when known.</summary>
    public string? Image { get; }

    /// <summary>
    /// True when vmsnap refuses to change the image until it is repaired: a check with <see cref="Qcow2RepairMode.All"/>
    /// (<c>qemu-img check -r all</c> repairs it the same way). Reading it still works where the damage allows.
    /// </summary>
    public bool RepairNeeded { get; }

    /// <summary>The message without what to do about it: where and what (a later refusal quotes it).</summary>
    internal string Found => Compose(Structure, FileOffset, Problem, Image);

    internal Qcow2FormatException WithImage(string image) =>
        Image is null ? new Qcow2FormatException(Structure, FileOffset, Problem, image, RepairNeeded) : this;

    private static string Compose(string structure, long? fileOffset, string problem, string? image)
    {
        string where = fileOffset is long o ? $"{structure} at file offset 0x{o:x}" : structure;
        return image is null ? $"qcow2 {where}: {problem}" : $"'{image}': qcow2 {where}: {problem}";
    }
}
