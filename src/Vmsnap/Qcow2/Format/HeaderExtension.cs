using System.Text;

namespace Vmsnap.Qcow2;

/// <summary>One header extension (type, data), kept byte for byte so unknown ones survive a header rewrite.</summary>
internal sealed record HeaderExtension(uint Type, byte[] Data)
{
    internal const uint End = 0x00000000;
    internal const uint BackingFormat = 0xe2792aca;
    internal const uint FeatureNameTable = 0x6803f857;
    internal const uint Bitmaps = 0x23852875;
    internal const uint FullDiskEncryption = 0x0537be77;
    internal const uint ExternalDataFile = 0x44415441;

    /// <summary>Bytes this extension takes in the header area: 8-byte type/length plus data padded to 8.</summary>
    internal int EncodedLength => 8 + Align8(Data.Length);

    internal static int Align8(int n) => (n + 7) & ~7;

    internal string DataAsString() => Encoding.UTF8.GetString(Data);
}

/// <summary>Which feature bitmap a feature-name-table entry refers to.</summary>
internal enum FeatureKind : byte
{
    Incompatible = 0,
    Compatible = 1,
    Autoclear = 2,
}

/// <summary>An entry of the feature name table extension: a name for one feature bit.</summary>
internal readonly record struct FeatureName(FeatureKind Kind, int Bit, string Name)
{
    internal const int EntrySize = 48;
    private const int NameLength = 46;

    /// <summary>The table QEMU 7.2 writes into images it creates (cluster sizes above 4 KiB).</summary>
    internal static readonly FeatureName[] QemuTable =
    [
        new(FeatureKind.Incompatible, 0, "dirty bit"),
        new(FeatureKind.Incompatible, 1, "corrupt bit"),
        new(FeatureKind.Incompatible, 2, "external data file"),
        new(FeatureKind.Incompatible, 3, "compression type"),
        new(FeatureKind.Incompatible, 4, "extended L2 entries"),
        new(FeatureKind.Compatible, 0, "lazy refcounts"),
        new(FeatureKind.Autoclear, 0, "bitmaps"),
        new(FeatureKind.Autoclear, 1, "raw external data"),
    ];

    internal static List<FeatureName> Parse(ReadOnlySpan<byte> data)
    {
        var names = new List<FeatureName>();
        for (int i = 0; i + EntrySize <= data.Length; i += EntrySize)
        {
            ReadOnlySpan<byte> e = data.Slice(i, EntrySize);
            ReadOnlySpan<byte> raw = e.Slice(2, NameLength);
            int nul = raw.IndexOf((byte)0);
            if (nul >= 0) raw = raw[..nul];
            names.Add(new FeatureName((FeatureKind)e[0], e[1], Encoding.UTF8.GetString(raw)));
        }
        return names;
    }

    internal static byte[] Encode(IReadOnlyList<FeatureName> names)
    {
        byte[] data = new byte[names.Count * EntrySize];
        for (int i = 0; i < names.Count; i++)
        {
            Span<byte> e = data.AsSpan(i * EntrySize, EntrySize);
            e[0] = (byte)names[i].Kind;
            e[1] = (byte)names[i].Bit;
            byte[] name = Encoding.UTF8.GetBytes(names[i].Name);
            name.AsSpan(0, Math.Min(name.Length, NameLength)).CopyTo(e[2..]);
        }
        return data;
    }
}
