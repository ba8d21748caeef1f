using Vmsnap.Storage;
using Vmsnap.Storage.LowLevel;

namespace Vmsnap.Qcow2;

/// <summary>
/// The backing file of an overlay, read-only: a raw file or another qcow2 image (whose own backing
/// chain is opened in turn). Bytes past its end read as zeroes.
/// </summary>
internal abstract class BackingStore : IDisposable
{
    internal abstract string Path { get; }
    internal abstract string Format { get; }
    internal abstract long Size { get; }

    /// <summary>Reads backing bytes at a guest offset; the part past the backing file's size is zero.</summary>
    internal void ReadAt(Span<byte> buffer, long offset)
    {
        long available = Math.Max(0, Math.Min(buffer.Length, Size - offset));
        if (available > 0) ReadWithin(buffer[..(int)available], offset);
        buffer[(int)available..].Clear();
    }

    protected abstract void ReadWithin(Span<byte> buffer, long offset);

    public abstract void Dispose();

    /// <summary>Opens the backing file named in an overlay's header (relative names against the overlay's folder).</summary>
    internal static BackingStore Open(Qcow2Header overlay, string overlayPath, Qcow2OpenOptions options, int depth)
    {
        string name = options.BackingFileOverride ?? overlay.BackingFile!;
        if (depth + 1 >= Qcow2Engine.MaxBackingDepth)
            throw new Qcow2FormatException("header", 8, $"backing chain deeper than {Qcow2Engine.MaxBackingDepth} images (a loop?) at '{name}'");
        if (name.Contains("://", StringComparison.Ordinal) || name.StartsWith("json:", StringComparison.Ordinal))
            throw new Qcow2FormatException("header", 8, $"backing file '{name}' is not a plain file name; vmsnap opens only local files");
        string path = options.BackingFileOverride is not null || System.IO.Path.IsPathRooted(name)
            ? name
            : System.IO.Path.Combine(System.IO.Path.GetDirectoryName(System.IO.Path.GetFullPath(overlayPath)) ?? ".", name);
        FileBlockDevice device;
        try
        {
            // Backing files are only read: like QEMU, keep writers away unless forced to share.
            device = Qcow2Image.OpenLocked(path, new FileBlockDeviceOptions { Lock = options.ForceShare ? ImageLockMode.ForceShare : ImageLockMode.Read });
        }
        catch (StorageException e)
        {
            throw new Qcow2FormatException("header", 8, $"backing file '{name}' cannot be opened: {e.Message}");
        }
        try
        {
            string? format = overlay.BackingFormat;
            if (format is null)
            {
                Span<byte> magic = stackalloc byte[4];
                format = device.Read(magic, 0) == 4 && System.Buffers.Binary.BinaryPrimitives.ReadUInt32BigEndian(magic) == Qcow2Header.Magic ? "qcow2" : "raw";
            }
            switch (format)
            {
                case "raw":
                    return new RawBacking(path, device);
                case "qcow2":
                    var options2 = new Qcow2OpenOptions { ReadOnly = true, OpenBackingFile = true, ForceShare = options.ForceShare };
                    return new Qcow2Backing(path, Qcow2Engine.Open(device, path, options2, ownsDevice: true, depth + 1));
                default:
                    throw new Qcow2FormatException("backing format extension", null, $"backing file format '{format}' is not supported (raw or qcow2)");
            }
        }
        catch
        {
            device.Dispose();
            throw;
        }
    }

    private sealed class RawBacking(string path, FileBlockDevice device) : BackingStore
    {
        internal override string Path => path;
        internal override string Format => "raw";
        internal override long Size { get; } = device.Length;

        protected override void ReadWithin(Span<byte> buffer, long offset)
        {
            int n = device.Read(buffer, offset);
            if (n < buffer.Length) buffer[n..].Clear();
        }

        public override void Dispose() => device.Dispose();
    }

    private sealed class Qcow2Backing(string path, Qcow2Engine engine) : BackingStore
    {
        internal override string Path => path;
        internal override string Format => "qcow2";
        internal override long Size => engine.State.VirtualSize;

        protected override void ReadWithin(Span<byte> buffer, long offset) => engine.ReadGuest(buffer, offset);

        public override void Dispose() => engine.Dispose();
    }
}
